"""The `sparrow` command line: demo, generate, train-target, train-draft, bench.

Thin wrappers over the library: argument parsing, progress and printing live here; no model,
decoding or training logic does. User errors (missing file, unreadable video, mismatched
draft, CUDA asked for but absent, ...) print one line and exit 2, never a traceback
(set SPARROW_DEBUG=1 to see it).
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path


class UserError(Exception):
    """An error the user can fix; printed as one line."""


# ----------------------------------------------------------------------------- helpers
def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but CUDA is not available on this machine "
                        f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
    return torch.device(name)


def _load_target(spec, device):
    from sparrow_kernels.targets import load_target

    kwargs = {"device": device}
    return load_target(spec, **kwargs)


def _load_draft(path, target, default_name=None):
    from sparrow_kernels.draft import SparrowDraft, committed_draft_dir

    path = path or committed_draft_dir(*([default_name] if default_name else []))
    try:
        draft = SparrowDraft.load(path, target)
    except FileNotFoundError as err:
        raise UserError(str(err)) from err
    if draft.config.vocab_size != target.vocab_size or draft.config.hidden_size != target.hidden_size:
        raise UserError(f"draft {path} does not match the target: draft vocab/hidden = "
                        f"{draft.config.vocab_size}/{draft.config.hidden_size}, target = "
                        f"{target.vocab_size}/{target.hidden_size}")
    return draft.to(target.device)


def _tree(args, device):
    """The device's tree preset (tree.TreeShape.for_device) with the --total-tokens/--depth/--top-k given."""
    from sparrow_kernels.tree import TreeShape

    try:
        return TreeShape.for_device(device).replace(
            **{key: getattr(args, key, None) for key in ("total_tokens", "depth", "top_k")})
    except ValueError as err:
        raise UserError(str(err)) from err


def _stream_text(chunks, decode, out=sys.stdout):
    """Print row 0's text as it is accepted; returns the last chunk (with the stats)."""
    ids, printed, last = [], "", None
    for chunk in chunks:
        last = chunk
        ids.extend(chunk.tokens[0])
        if decode is not None:
            text = decode(ids)
            if text.startswith(printed):
                out.write(text[len(printed):])
            else:  # a detokenizer that rewrites earlier text: print the whole line again
                out.write("\r" + text)
            printed = text
            out.flush()
    out.write("\n")
    return last, ids


def _decoder(target):
    from sparrow_kernels.engine import _detokenizer

    return _detokenizer(target, None)


def _speed_line(label, stats, n_tokens):
    tps = n_tokens / stats.total_s if stats.total_s > 0 else float("nan")
    dec = (n_tokens - 1) / stats.decode_s if stats.decode_s > 0 else float("nan")
    return (f"{label:<14} {n_tokens:4d} tokens  prefill {stats.prefill_s * 1e3:7.0f} ms  decode "
            f"{stats.decode_s * 1e3:7.0f} ms  ({dec:6.1f} tok/s decode, {tps:6.1f} tok/s end-to-end)")


# ----------------------------------------------------------------------------- commands
def cmd_demo(args) -> int:
    import torch

    from sparrow_kernels.data.synthetic import VideoWorld, heldout_seed
    from sparrow_kernels.engine import SparrowGenerator, autoregressive_generate

    torch.manual_seed(0)
    device = _device(args.device)
    target = _load_target("tiny", device)
    draft = _load_draft(args.draft, target)
    visual_tokens = args.visual_tokens or (1000 if args.quick else 6000)
    max_new = args.max_new_tokens or (48 if args.quick else 96)
    frames = target.frames_for(visual_tokens)
    world = VideoWorld(heldout_seed(args.seed))
    video = world.render(frames)
    prompt = target.make_prompt(video)
    tree = _tree(args, device)
    print(f"Sparrow demo: built-in tiny video LM ({target.num_layers} layers, d={target.hidden_size}), "
          f"synthetic video of {frames} frames = {target.visual_tokens_for(frames)} visual tokens, "
          f"device {device}, tree {tree.as_dict()}")
    print(f"ground truth: {world.caption}")

    ar = autoregressive_generate(target, [prompt], max_new, temperature=args.temperature, seed=args.seed,
                                 tokenizer=target.tokenizer)          # KV cache sized from prompt_lengths
    gen = SparrowGenerator(target, draft, tree, tokenizer=target.tokenizer)
    print("sparrow     : ", end="", flush=True)
    last, ids = _stream_text(gen.stream([prompt], max_new, temperature=args.temperature, seed=args.seed),
                             _decoder(target))
    st = last.stats
    print(_speed_line("autoregressive", ar.stats, len(ar.tokens[0])))
    print(_speed_line("sparrow", st, len(ids)))
    same = ids == ar.tokens[0]
    speedup_dec = ar.stats.decode_s / st.decode_s if st.decode_s > 0 else float("nan")
    speedup_e2e = ar.stats.total_s / st.total_s if st.total_s > 0 else float("nan")
    print(f"tau {st.tau:.2f} tokens/step over {st.steps} steps; decoding speedup {speedup_dec:.2f}x, "
          f"end-to-end {speedup_e2e:.2f}x; output identical to autoregressive: "
          f"{same if args.temperature == 0 else 'n/a (sampling)'}")
    if args.temperature == 0 and not same:
        print("ERROR: speculative output differs from plain greedy decoding", file=sys.stderr)
        return 1
    return 0


def cmd_generate(args) -> int:
    from sparrow_kernels.engine import SparrowGenerator, autoregressive_generate
    from sparrow_kernels.video_io import read_video

    device = _device(args.device)
    target = _load_target(args.target or "tiny", device)
    frames = read_video(args.video, num_frames=args.frames, fps=args.fps)
    prompt = target.make_prompt(frames, args.prompt) if hasattr(target, "make_prompt") else None
    if prompt is None:
        from sparrow_kernels.targets.base import VideoPrompt

        prompt = VideoPrompt(frames=frames, prompt=args.prompt)
    decode = _decoder(target)
    if args.no_draft:
        res = autoregressive_generate(target, [prompt], args.max_new_tokens, temperature=args.temperature,
                                      top_p=args.top_p, seed=args.seed)
        print(decode(res.tokens[0]) if decode else res.tokens[0])
        stats, n = res.stats, len(res.tokens[0])
    else:
        if args.target and not args.draft:
            raise UserError("--target DIR needs --draft DIR (train one with `sparrow train-draft`), "
                            "or pass --no-draft for plain decoding")
        draft = _load_draft(args.draft, target)
        gen = SparrowGenerator(target, draft, _tree(args, device))
        last, ids = _stream_text(gen.stream([prompt], args.max_new_tokens, temperature=args.temperature,
                                            top_p=args.top_p, seed=args.seed), decode)
        stats, n = last.stats, len(ids)
    if args.stats:
        print(_speed_line("stats", stats, n))
        print(f"tau {stats.tau:.2f}, steps {stats.steps}, draft {stats.draft_s * 1e3:.0f} ms, "
              f"verify {stats.verify_s * 1e3:.0f} ms, bookkeeping {stats.bookkeeping_s * 1e3:.0f} ms")
    return 0


def cmd_train_target(rest) -> int:
    from sparrow_kernels.training.train_target import main

    return main(rest) or 0


def cmd_train_draft(rest) -> int:
    from sparrow_kernels.training.train_draft import main

    return main(rest) or 0


def cmd_bench(which: str, rest) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / ("run.py" if which == "kernels" else "e2e.py")
    if not script.is_file():
        raise UserError(f"the benchmarks ship with the source tree; {script} not found "
                        f"(clone the repository and run `python benchmarks/{script.name}`)")
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparrow", description="Lossless speculative decoding for video LLMs.")
    sub = p.add_subparsers(dest="command", required=True)

    def tree_opts(sp):
        sp.add_argument("--total-tokens", dest="total_tokens", type=int, default=None, help="draft tree nodes incl. root")
        sp.add_argument("--depth", type=int, default=None, help="draft tree expansion depth")
        sp.add_argument("--top-k", dest="top_k", type=int, default=None, help="children per expanded node (1 = chain)")

    d = sub.add_parser("demo", help="tiny video LM + committed Sparrow draft vs autoregressive, side by side")
    d.add_argument("--quick", action="store_true", help="a shorter video and answer (CI smoke)")
    d.add_argument("--visual-tokens", type=int, default=None, help="visual tokens of the synthetic video (default 6000)")
    d.add_argument("--max-new-tokens", type=int, default=None)
    d.add_argument("--temperature", type=float, default=0.0)
    d.add_argument("--seed", type=int, default=0, help="which held-out synthetic video")
    d.add_argument("--draft", default=None, help="draft directory (default: the committed Sparrow draft)")
    d.add_argument("--device", default="cpu")
    tree_opts(d)

    g = sub.add_parser("generate", help="answer a prompt about a video file")
    g.add_argument("--video", required=True, help="mp4/webm/avi file")
    g.add_argument("--prompt", required=True)
    g.add_argument("--target", default=None, help="local Qwen2.5-VL / LLaVA-OneVision directory (default: built-in tiny LM)")
    g.add_argument("--draft", default=None, help="draft directory (default: the committed draft of the tiny LM)")
    g.add_argument("--no-draft", action="store_true", help="plain autoregressive decoding")
    g.add_argument("--frames", type=int, default=None, help="sample this many frames uniformly")
    g.add_argument("--fps", type=float, default=None, help="or sample at this rate")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", dest="top_p", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stats", action="store_true", help="print tau and the time split")
    g.add_argument("--device", default="auto")
    tree_opts(g)

    sub.add_parser("train-target", help="train the tiny video LM (options: sparrow train-target --help)", add_help=False)
    sub.add_parser("train-draft", help="train a draft (options: sparrow train-draft --help)", add_help=False)
    b = sub.add_parser("bench", help="benchmarks: kernels (benchmarks/run.py) or e2e (benchmarks/e2e.py)", add_help=False)
    b.add_argument("which", choices=("kernels", "e2e"))
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv and argv[0] in ("train-target", "train-draft"):
            return cmd_train_target(argv[1:]) if argv[0] == "train-target" else cmd_train_draft(argv[1:])
        if argv and argv[0] == "bench":
            if len(argv) < 2 or argv[1] not in ("kernels", "e2e"):
                parser.error("bench needs 'kernels' or 'e2e'")
            return cmd_bench(argv[1], argv[2:])
        args = parser.parse_args(argv)
        return {"demo": cmd_demo, "generate": cmd_generate}[args.command](args)
    except KeyboardInterrupt:
        print("sparrow: interrupted", file=sys.stderr)
        return 130
    except (UserError, FileNotFoundError, NotImplementedError, ValueError, MemoryError, OSError) as err:
        if os.environ.get("SPARROW_DEBUG"):
            raise
        print(f"sparrow: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
