"""The `sparrow` command line: demo, generate, train-target, train-draft, bench, export-vllm.

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
LONG_CLIP_FRAMES = 64    # reading more frames than this without --frames / --fps prints a notice
MAX_VISUAL_TOKENS = 100_000   # demo and generate hold the whole video and its KV cache in memory
DEMO_MAX_VISUAL_TOKENS = MAX_VISUAL_TOKENS


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _note(text: str) -> None:
    print(f"sparrow: {text}", file=sys.stderr, flush=True)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"--device {name!r} is not a device name; expected auto, cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: Sparrow runs on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for, but CUDA is not available on this machine "
                            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _threads(args, device) -> str:
    """Pick the CPU threads (sparrow_kernels.ops.threads, the rule train-target uses); a header note."""
    if device.type != "cpu":
        return ""
    from sparrow_kernels.ops.threads import pick_threads

    count, why = pick_threads(args.threads)
    return f", {count} thread{'s' if count > 1 else ''} ({why})"


# errors a checkpoint that cannot be read raises from inside torch / safetensors / transformers
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError)


def _load_target(spec, device):
    from sparrow_kernels.targets import load_target, resolve_target

    if resolve_target(spec) != "tiny":      # one-line output: no "Loading weights" bar from transformers
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return load_target(spec, device=device)
    except _LOAD_ERRORS as err:
        what = ("the built-in tiny video LM" if spec in (None, "tiny") else
                f"the committed target {spec}" if _is_world(spec) else f"--target {spec}")
        raise UserError(f"cannot load {what}: {_one_line(err)}") from err


def _is_world(spec) -> bool:
    """Whether `spec` names the committed world target (by name or by its directory)."""
    from sparrow_kernels.targets import WORLD_TARGET, committed_target

    return committed_target(spec) == WORLD_TARGET


def _world_frame_size() -> int:
    from sparrow_kernels.targets.world_prompt import WORLD_FRAME_SIZE

    return WORLD_FRAME_SIZE


def _draft_path(draft, spec, alternative: str = "") -> str:
    """--draft, else the committed draft of a committed target ('tiny' or the world target); a
    user's target without --draft is a UserError (`alternative`: another way out, said after)."""
    from sparrow_kernels.speculative.draft import committed_draft_dir
    from sparrow_kernels.targets import committed_target

    if draft:
        return draft
    owner = committed_target(spec)
    if owner is None:
        raise UserError(f"--target {spec} has no committed draft: pass --draft DIR (train one with "
                        f"`sparrow train-draft --target {spec}`){alternative}")
    return committed_draft_dir(target=owner)


def _load_draft(path, target):
    from sparrow_kernels.speculative.draft import SparrowDraft

    try:
        draft = SparrowDraft.load(path, target)
    except _LOAD_ERRORS as err:  # missing files, not a draft, unreadable or mismatched weights
        raise UserError(f"--draft {path}: {_one_line(err)}") from err
    if draft.config.vocab_size != target.vocab_size or draft.config.hidden_size != target.hidden_size:
        raise UserError(f"--draft {path} does not match the target: draft vocab/hidden = "
                        f"{draft.config.vocab_size}/{draft.config.hidden_size}, target = "
                        f"{target.vocab_size}/{target.hidden_size}")
    return draft.to(target.device)


def _tree(args, device):
    """The device's tree preset for the temperature (tree.TreeShape.for_device) with the --total-tokens/--depth/--top-k given."""
    from sparrow_kernels.speculative.tree import TreeShape

    try:
        return TreeShape.for_device(device, float(getattr(args, "temperature", 0.0) or 0.0)).replace(
            **{key: getattr(args, key, None) for key in ("total_tokens", "depth", "top_k")})
    except ValueError as err:
        raise UserError(str(err)) from err


def _stream_text(chunks, decode, out=None):
    """Print row 0's text as it is accepted; returns the last chunk (with the stats)."""
    out = out if out is not None else sys.stdout     # the stdout of now, not of import time
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
    from sparrow_kernels.targets.decoding import detokenizer

    return detokenizer(target, None, skip_special_tokens=True)


def _decode_rate(stats, n_tokens) -> float:
    """Decode-phase tokens/s (the first token comes from the prefill)."""
    return (n_tokens - 1) / stats.decode_s if stats.decode_s > 0 else float("nan")


def _speed_line(label, stats, n_tokens):
    tps = n_tokens / stats.total_s if stats.total_s > 0 else float("nan")
    return (f"{label:<14} {n_tokens:4d} tokens  prefill {stats.prefill_s * 1e3:7.0f} ms  decode "
            f"{stats.decode_s * 1e3:7.0f} ms  ({_decode_rate(stats, n_tokens):6.1f} tok/s decode, "
            f"{tps:6.1f} tok/s end-to-end)")


def _spread(values, fmt: str = "{:.2f}x") -> str:
    """'median M (min a, max b)' of per-round values, or the one value."""
    import statistics

    if len(values) == 1:
        return fmt.format(values[0])
    return (f"median {fmt.format(statistics.median(values))} (min {fmt.format(min(values))}, "
            f"max {fmt.format(max(values))})")


def _unknown_words(target, text: str) -> list[str]:
    """Words of `text` a word-level tokenizer (the tiny LM's) does not know; [] for others."""
    vocab = getattr(getattr(target, "tokenizer", None), "word_to_id", None)
    if not isinstance(vocab, dict):
        return []
    return list(dict.fromkeys(w for w in text.lower().split() if w not in vocab))


def _visual_tokens(target, prompt) -> int:
    """Visual tokens the prompt's frames become: the target's own count when it has one, else the
    prompt length minus its text, measured through the preprocessing (2 vs 4 frames)."""
    from dataclasses import replace

    import torch

    frames = prompt.frames
    if hasattr(target, "visual_tokens_for"):
        return int(target.visual_tokens_for(frames.shape[0]))
    total = target.prompt_lengths([prompt])[0]
    idx = torch.arange(4) % frames.shape[0]
    two, four = target.prompt_lengths([replace(prompt, frames=frames[idx[:2]]), replace(prompt, frames=frames[idx])])
    return int(total - (two - (four - two)))


# ----------------------------------------------------------------------------- commands
def _demo_prompt(args, target, tiny: bool):
    """The demo's held-out clip and its reference text: the tiny LM's synthetic world (its caption)
    or the narrated world (one phrasing of its event log) for an HF target, asked args.prompt."""
    if tiny:
        from sparrow_kernels.data.synthetic import VideoWorld, heldout_seed

        visual_tokens = args.visual_tokens if args.visual_tokens is not None else (1000 if args.quick else 6000)
        frames = target.frames_for(visual_tokens)
        world = VideoWorld(heldout_seed(args.seed))
        return target.make_prompt(world.render(frames)), visual_tokens, world.caption
    import random

    from sparrow_kernels.data.narration import narration
    from sparrow_kernels.data.world import World, heldout_world_seed
    from sparrow_kernels.targets.world_prompt import world_prompt

    visual_tokens = args.visual_tokens if args.visual_tokens is not None else (512 if args.quick else 1500)
    world = World(heldout_world_seed(7000 + args.seed))
    prompt = world_prompt(target, world, visual_tokens, args.prompt)
    return prompt, visual_tokens, narration(world, random.Random(0))


def cmd_demo(args) -> int:
    import torch

    from sparrow_kernels.speculative.engine import SparrowGenerator, autoregressive_generate
    from sparrow_kernels.targets import WORLD_TARGET

    torch.manual_seed(0)
    if args.visual_tokens is not None and args.visual_tokens > DEMO_MAX_VISUAL_TOKENS:
        raise UserError(f"--visual-tokens {args.visual_tokens}: the demo holds the whole video and its KV cache in "
                        f"memory; use at most {DEMO_MAX_VISUAL_TOKENS:,} (the README's study goes to 25,000)")
    if not args.prompt.strip():
        raise UserError("--prompt is empty; ask something about the video, e.g. --prompt \"Describe the video.\"")
    device = _device(args.device)
    threads = _threads(args, device)
    spec = args.target or WORLD_TARGET
    tiny = spec == "tiny"
    draft_path = _draft_path(args.draft, spec)            # before loading anything
    target = _load_target(spec, device)
    draft = _load_draft(draft_path, target)
    prompt, visual_tokens, reference = _demo_prompt(args, target, tiny)
    max_new = args.max_new_tokens if args.max_new_tokens is not None else (
        (48 if args.quick else 96) if tiny else (96 if args.quick else 320))
    tree = _tree(args, device)
    greedy = args.temperature == 0
    text = _decoder(target)
    decode = text if text is not None else (lambda ids: " ".join(map(str, ids)))   # no tokenizer: the ids
    frames = prompt.frames.shape[0]
    if tiny:
        what = f"built-in tiny video LM ({target.num_layers} layers, d={target.hidden_size})"
        clip = f"synthetic video of {frames} frames"
    else:
        kind = getattr(getattr(getattr(target, "model", None), "config", None), "model_type", None)
        kind = {"qwen2_5_vl": "Qwen2.5-VL", "llava_onevision": "LLaVA-OneVision"}.get(kind, kind or "HF model")
        what = (f"{spec} (stock {kind}: {target.num_layers} layers, d={target.hidden_size}, vocabulary "
                f"{target.vocab_size:,})")
        asked = f"prompt {args.prompt!r}" if prompt.prompt is not None else "fixed prompt ids (no tokenizer)"
        clip = f"held-out world clip of {frames} frames at {prompt.fps:.3g} fps, {asked}"
    print(f"Sparrow demo: {what}, {clip} = {_visual_tokens(target, prompt):,} visual tokens "
          f"(asked {visual_tokens}), up to {max_new} new tokens, device {device}{threads}, tree {tree.as_dict()}")
    print(f"{'ground truth' if tiny else 'reference':<14}: {reference}")

    def run_ar():
        return autoregressive_generate(target, [prompt], max_new, temperature=args.temperature, seed=args.seed,
                                       tokenizer=target.tokenizer)

    gen = SparrowGenerator(target, draft, tree, tokenizer=target.tokenizer)
    print("autoregressive pass (the target alone, no draft: the reference answer and timing) ...", flush=True)
    ar_runs = [run_ar()]
    print(f"autoregressive: {decode(ar_runs[0].tokens[0])}")
    print("sparrow       : ", end="", flush=True)
    last, ids = _stream_text(gen.stream([prompt], max_new, temperature=args.temperature, seed=args.seed), decode)
    sp_runs = [(last.stats, ids)]
    if args.rounds > 1:
        print(f"timing: {args.rounds - 1} more interleaved round(s) of autoregressive then sparrow ...", flush=True)
    for _ in range(args.rounds - 1):
        ar_runs.append(run_ar())
        res = gen.generate([prompt], max_new, temperature=args.temperature, seed=args.seed)
        sp_runs.append((res.stats, res.tokens[0]))
    ar_rates = [_decode_rate(r.stats, len(r.tokens[0])) for r in ar_runs]
    sp_rates = [_decode_rate(st, len(tokens)) for st, tokens in sp_runs]
    speedups = [s / a for a, s in zip(ar_rates, sp_rates)]
    e2e = [(len(t) / st.total_s) / (len(r.tokens[0]) / r.stats.total_s) for r, (st, t) in zip(ar_runs, sp_runs)]
    rounds = f"over {len(speedups)} interleaved round{'s' if len(speedups) > 1 else ''}"
    print(f"decode tok/s {rounds}: autoregressive {_spread(ar_rates, '{:.1f}')}, sparrow {_spread(sp_rates, '{:.1f}')}")
    print(f"tau {sp_runs[0][0].tau:.2f} tokens/step over {sp_runs[0][0].steps} steps; decoding speedup "
          f"{_spread(speedups)}; end-to-end (prefill included) {_spread(e2e)}")
    if not greedy:
        print("identical: n/a at temperature > 0 (sampling is lossless in distribution, not token for token)")
        return 0
    differ = [k + 1 for k, (r, (_, t)) in enumerate(zip(ar_runs, sp_runs)) if t != r.tokens[0]]
    if differ:
        print(f"ERROR: the speculative output differs from the target's own greedy answer in round(s) {differ}",
              file=sys.stderr)
        return 1
    print("identical: yes - sparrow's answer is token for token the target's own greedy answer (the "
          "autoregressive line; lossless, which says nothing about whether the answer is right)")
    return 0


def cmd_generate(args) -> int:
    import warnings

    from sparrow_kernels.data.video_io import VideoTooLargeError, probe_video, read_video, sampled_fps
    from sparrow_kernels.speculative.engine import SparrowGenerator, autoregressive_generate

    if not args.prompt.strip():
        raise UserError("--prompt is empty; ask something about the video, e.g. --prompt \"describe the video\"")
    from sparrow_kernels.targets import WORLD_TARGET

    spec = args.target or WORLD_TARGET
    draft_path = None if args.no_draft else _draft_path(args.draft, spec, ", or pass --no-draft for plain decoding")
    device = _device(args.device)
    _threads(args, device)
    info = probe_video(args.video)
    target = _load_target(spec, device)
    unknown = _unknown_words(target, args.prompt)
    if unknown:
        _note(f"note: the built-in tiny video LM knows only the words of its synthetic captions and questions; "
              f"these words of --prompt are unknown to it (read as <unk>): {', '.join(unknown)}")
    whole = args.frames is None and args.fps is None

    def long_clip_note(count: int, verb: str) -> None:
        visual = f" = {target.visual_tokens_for(count):,} visual tokens" if hasattr(target, "visual_tokens_for") else ""
        _note(f"note: {verb} all {count:,} frames of {args.video}{visual}; pass --frames N or --fps R to sample fewer")

    if whole and info.frame_count > LONG_CLIP_FRAMES:
        long_clip_note(info.frame_count, "reading")
    height = args.height if args.height is not None else (_world_frame_size() if _is_world(spec) else None)
    size = None
    if height is not None and info.height > 0 and info.width > 0 and height != info.height:
        size = (height, max(1, round(info.width * height / info.height)))   # the aspect ratio kept
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            frames = read_video(args.video, num_frames=args.frames, fps=args.fps, size=size)
        except VideoTooLargeError as err:
            raise UserError(f"{err} (here: --frames N, --fps R or --height H)") from err
    for w in caught:  # one line each, not Python's warning format with its source line
        _note(f"warning: {_one_line(w.message)}")
    if whole and not info.frame_count and frames.shape[0] > LONG_CLIP_FRAMES:  # no count known before reading
        long_clip_note(frames.shape[0], "read")
    if hasattr(target, "make_prompt"):
        prompt = target.make_prompt(frames, args.prompt)
    else:
        from sparrow_kernels.targets.base import VideoPrompt

        # --fps R samples every 1/R s (R capped at the stream's rate); otherwise frames cover the clip evenly
        rate = min(args.fps, info.fps) if args.fps is not None and info.fps > 0 else args.fps
        prompt = VideoPrompt(frames=frames, prompt=args.prompt,
                             fps=rate if rate is not None else sampled_fps(info, frames.shape[0]))
    visual = _visual_tokens(target, prompt)
    if visual > MAX_VISUAL_TOKENS:
        raise UserError(f"{frames.shape[0]:,} frames of {frames.shape[1]}x{frames.shape[2]} make {visual:,} visual "
                        f"tokens, more than the CLI's bound of {MAX_VISUAL_TOKENS:,}; pass fewer --frames, a lower "
                        f"--fps or a smaller --height")
    decode = _decoder(target)
    if args.no_draft:
        res = autoregressive_generate(target, [prompt], args.max_new_tokens, temperature=args.temperature,
                                      top_p=args.top_p, seed=args.seed)
        print(decode(res.tokens[0]) if decode else res.tokens[0])
        stats, n = res.stats, len(res.tokens[0])
    else:
        draft = _load_draft(draft_path, target)
        gen = SparrowGenerator(target, draft, _tree(args, device))
        last, ids = _stream_text(gen.stream([prompt], args.max_new_tokens, temperature=args.temperature,
                                            top_p=args.top_p, seed=args.seed), decode)
        stats, n = last.stats, len(ids)
    if args.stats:
        print(f"video: {frames.shape[0]} frames of {frames.shape[1]}x{frames.shape[2]} "
              f"(of {info.frame_count or '?'} in the file) = {visual:,} visual tokens")
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
def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def _float_in(low: float, high: float = float("inf"), low_open: bool = False, what: str = ""):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value > low if low_open else value >= low) or not value <= high or value != value:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


TEMPERATURE = _float_in(0.0, 1e6, what="a finite number >= 0 (0 = greedy)")


def cmd_export_vllm(args) -> int:
    """A Sparrow draft + its Qwen2.5-VL target -> a directory vLLM loads (docs/serving.md)."""
    from sparrow_kernels.integrations.vllm.export import METHOD, export_vllm

    out = export_vllm(args.draft, args.target, args.out)
    print(f"wrote {out}: serve with  vllm serve {args.target} --speculative-config "
          f"'{{\"method\": \"{METHOD}\", \"model\": \"{out}\", \"num_speculative_tokens\": 3}}'")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparrow", description="Lossless speculative decoding for video LLMs.")
    sub = p.add_subparsers(dest="command", required=True)

    def common_opts(sp):
        sp.add_argument("--total-tokens", dest="total_tokens", type=int, default=None, help="draft tree nodes incl. root")
        sp.add_argument("--depth", type=int, default=None, help="draft tree expansion depth")
        sp.add_argument("--top-k", dest="top_k", type=int, default=None, help="children per expanded node (1 = chain)")
        sp.add_argument("--threads", type=_int_at_least(0), default=0,
                        help="CPU threads (0: $OMP_NUM_THREADS, else 2 on an idle machine and 1 on a busy one)")

    d = sub.add_parser("demo", help="a committed target + its Sparrow draft vs autoregressive, side by side")
    d.add_argument("--quick", action="store_true", help="a shorter video and answer (CI smoke)")
    d.add_argument("--target", default=None,
                   help="'qwen2_5_vl_world' (default: the committed Qwen2.5-VL of the narrated world), 'tiny' "
                        "(the built-in tiny video LM) or a local Qwen2.5-VL / LLaVA-OneVision directory (with --draft)")
    d.add_argument("--prompt", default="Describe the video.", help="the request (HF targets; default %(default)r)")
    d.add_argument("--visual-tokens", type=_int_at_least(1), default=None,
                   help="visual tokens of the held-out video (default 1500, --quick 512; tiny: 6000, --quick 1000)")
    d.add_argument("--max-new-tokens", type=_int_at_least(1), default=None,
                   help="default 320, --quick 96 (tiny: 96, --quick 48)")
    d.add_argument("--temperature", type=TEMPERATURE, default=0.0)
    d.add_argument("--seed", type=int, default=0, help="which held-out video")
    d.add_argument("--rounds", type=_int_at_least(1), default=3,
                   help="interleaved autoregressive / sparrow rounds; the speedup is shown as median, min, max")
    d.add_argument("--draft", default=None, help="draft directory (default: the target's committed Sparrow draft)")
    d.add_argument("--device", default="cpu")
    common_opts(d)

    g = sub.add_parser("generate", help="answer a prompt about a video file")
    g.add_argument("--video", required=True, help="mp4/webm/avi file")
    g.add_argument("--prompt", required=True)
    g.add_argument("--target", default=None,
                   help="'qwen2_5_vl_world' (default: the committed Qwen2.5-VL of the narrated world), 'tiny' "
                        "(the built-in tiny video LM) or a local Qwen2.5-VL / LLaVA-OneVision directory")
    g.add_argument("--draft", default=None,
                   help="draft directory (default: the committed Sparrow draft of a committed target)")
    g.add_argument("--no-draft", action="store_true", help="plain autoregressive decoding")
    g.add_argument("--frames", type=_int_at_least(1), default=None,
                   help="sample this many frames uniformly (default: every frame)")
    g.add_argument("--fps", type=_float_in(0.0, 1e9, low_open=True, what="a number > 0"), default=None,
                   help="or sample at this rate")
    g.add_argument("--height", type=_int_at_least(1), default=None,
                   help="resize frames to this height, aspect ratio kept (default: 112 for the committed world "
                        "target, its training size; as stored otherwise)")
    g.add_argument("--temperature", type=TEMPERATURE, default=0.0)
    g.add_argument("--top-p", dest="top_p", type=_float_in(0.0, 1.0, low_open=True, what="in (0, 1]"), default=1.0)
    g.add_argument("--max-new-tokens", type=_int_at_least(1), default=128)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stats", action="store_true", help="print the frames and visual tokens used, tau and the time split")
    g.add_argument("--device", default="auto")
    common_opts(g)

    sub.add_parser("train-target", help="train the tiny video LM (options: sparrow train-target --help)", add_help=False)
    sub.add_parser("train-draft", help="train a draft (options: sparrow train-draft --help)", add_help=False)
    sub.add_parser("bench", help="benchmarks: kernels (benchmarks/run.py) or e2e (benchmarks/e2e.py)", add_help=False)

    x = sub.add_parser("export-vllm", help="write a Sparrow draft as a vLLM speculative model (docs/serving.md)")
    x.add_argument("--draft", required=True, help="Sparrow draft directory (config.json + model.safetensors)")
    x.add_argument("--target", required=True, help="the draft's Qwen2.5-VL target: a local Hugging Face directory")
    x.add_argument("--out", required=True, help="directory to write")
    return p


BENCH_HELP = """usage: sparrow bench {kernels,e2e} [options]

Run a benchmark of the source tree (they ship with the repository, not the wheel):
  kernels   benchmarks/run.py: the ops against their baselines
  e2e       benchmarks/e2e.py: autoregressive vs drafts at several visual-token counts

Options are the script's own: sparrow bench kernels --help, sparrow bench e2e --help."""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv and argv[0] in ("train-target", "train-draft"):
            return cmd_train_target(argv[1:]) if argv[0] == "train-target" else cmd_train_draft(argv[1:])
        if argv and argv[0] == "bench":
            if len(argv) >= 2 and argv[1] in ("-h", "--help"):
                print(BENCH_HELP)
                return 0
            if len(argv) < 2 or argv[1] not in ("kernels", "e2e"):
                print(BENCH_HELP.splitlines()[0], file=sys.stderr)
                print("sparrow bench: error: name the benchmark: kernels or e2e", file=sys.stderr)
                return 2
            return cmd_bench(argv[1], argv[2:])
        args = parser.parse_args(argv)
        return {"demo": cmd_demo, "generate": cmd_generate, "export-vllm": cmd_export_vllm}[args.command](args)
    except KeyboardInterrupt:
        print("sparrow: interrupted", file=sys.stderr)
        return 130
    except (UserError, FileNotFoundError, NotImplementedError, ValueError, MemoryError, OSError) as err:
        if os.environ.get("SPARROW_DEBUG"):
            raise
        print(f"sparrow: error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
