"""Real-size costs and a projected decoding speedup for Qwen2.5-VL-7B / LLaVA-OneVision-7B.

A CPU has ~100x less compute per byte than an H100, so CPU speedups say little about the
trade-off on a GPU. This script times, with random weights in the real language-model shapes
(28 layers, hidden 3584, 28 query / 4 KV heads of 128, MLP 18944, vocabulary 152064; the
vision tower is a small stand-in, it only runs at prefill, which is not timed), through the
stock transformers classes and the same adapters, draft and ops the engine uses:

  * a plain decode step (`forward_tree` with one node) over a KV cache of L tokens,
  * a tree verification of N nodes (`forward_tree` with a tree mask, feature layers captured),
  * a Sparrow draft phase (`build_tree` + `extend` of a one-layer draft whose cache holds only
    text entries) and a visual-KV draft phase (the same draft over all L + text entries),

at L = 0.5k .. 25k cached visual tokens, and combines them with tau into a **projection**
(not a measurement of the full pipeline): speedup = tau x decode step / (draft phase + tree
verification). tau comes from the built-in tiny video LM and its committed drafts, measured
here with the same tree settings on held-out synthetic videos (or `--tau NAME=VALUE`).
Timing: `triton.testing.do_bench` on CUDA, median wall-clock on CPU. It asserts nothing.

    python benchmarks/gpu_projection.py --device cuda                 # both 7B shapes (a lent GPU)
    python benchmarks/gpu_projection.py --tiny --visual-tokens 64,128  # the code path on a CPU (tests)
    # the same timings, projected again with another workload's tau (no timing, no GPU):
    python benchmarks/gpu_projection.py --reproject gpu_projection.json --tau-from e2e.json --out world.json
    python benchmarks/gpu_projection.py --reproject gpu_projection.json --tau sparrow=4.37 --tau visual_kv=2.95 \
        --out paper_tau.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SEVEN_B = dict(num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, intermediate_size=18944, vocab_size=152064)
TINY = dict(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=96, vocab_size=160)
MODELS = {"qwen2.5-vl-7b": "qwen", "llava-ov-7b": "llava"}
TEXT_ENTRIES = 320           # text entries in a draft cache: prompt text + generated answer so far


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
    ap.add_argument("--visual-tokens", default="500,1500,6000,12000,25000")
    ap.add_argument("--nodes", default="8,16,30,64", help="tree sizes to time the verification at")
    ap.add_argument("--tree", default=None, metavar="TOTAL,DEPTH,TOPK",
                    help="the draft tree of the projection (default: the CLI's GPU tree)")
    ap.add_argument("--tau", action="append", default=[], metavar="METHOD=VALUE",
                    help="fixed tau for sparrow / visual_kv instead of measuring it on the tiny video LM")
    ap.add_argument("--tau-from", default=None, metavar="E2E_JSON",
                    help="per-length greedy tau of sparrow / visual_kv from an e2e.py study (its lengths must "
                         "include --visual-tokens)")
    ap.add_argument("--reproject", default=None, metavar="TIMINGS_JSON",
                    help="no timing: recompute the projection of a saved run with --tau / --tau-from")
    ap.add_argument("--tau-videos", type=int, default=2)
    ap.add_argument("--tau-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny LM shapes instead of 7B (CPU smoke test of the code path)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/gpu_projection.json; required with "
                                                 "--reproject")
    return ap.parse_args(argv)


def bench_ms(fn, device: torch.device, repeats: int = 7) -> float:
    """Median milliseconds of fn() over `repeats` calls on the CPU (after one warm-up call; callers
    that interleave methods pass 1 and take the median over their rounds)."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return float(do_bench(fn, warmup=25, rep=100))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(3):
            fn()
        times = []
        for _ in range(20):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    if repeats > 1:
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def build_target(kind: str, dims: dict, device: torch.device, dtype: torch.dtype):
    """A stock HF model with these language-model shapes and random weights, in its adapter."""
    if kind == "qwen":
        from sparrow_kernels.targets.hf_qwen import QwenVLTarget as Adapter
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
    else:
        from sparrow_kernels.targets.hf_llava import LlavaOneVisionTarget as Adapter
        from transformers import LlavaOnevisionForConditionalGeneration as Model
    config = Adapter.tiny_config(**dims)          # the given LM shapes, a small vision tower
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = Model(config)
    finally:
        torch.set_default_dtype(previous)
    return Adapter(model.to(device=device, dtype=dtype).eval())


def synthetic_state(target, kind: str, length: int):
    """An HFTargetState as after a prefill of `length` tokens, with random K/V (costs do not
    depend on the values)."""
    from sparrow_kernels.targets.hf_common import UNBOUNDED_CAPACITY, HFTargetState, new_dynamic_cache

    text = target.model.config.text_config
    kv_heads, head_dim = text.num_key_value_heads, getattr(text, "head_dim", None) or \
        text.hidden_size // text.num_attention_heads
    shape = (1, kv_heads, length, head_dim)
    layer_kv = [(torch.randn(shape, device=target.device, dtype=target.dtype),
                 torch.randn(shape, device=target.device, dtype=target.dtype)) for _ in range(target.num_layers)]
    lengths = torch.tensor([length], device=target.device)
    position_rows = 3 if kind == "qwen" else 1
    return HFTargetState(lengths=lengths, capacity=UNBOUNDED_CAPACITY, cache=new_dynamic_cache(layer_kv),
                         first_position=torch.full((position_rows, 1), length, device=target.device),
                         prompt_lengths=lengths.clone(), slot_count=length)


def random_tree(nodes: int, device):
    """A bushy tree of `nodes` nodes (each node has up to 4 children, breadth first)."""
    from sparrow_kernels.speculative.tree import tree_layout

    parents = torch.tensor([[-1] + [(i - 1) // 4 for i in range(1, nodes)]], device=device)
    depth, tree_mask, _, _ = tree_layout(parents)
    return depth, tree_mask


def make_draft(target, visual_kv: bool):
    from sparrow_kernels.speculative.draft import DraftConfig, SparrowDraft

    L = target.num_layers
    text = target.model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    cfg = DraftConfig(hidden_size=target.hidden_size, num_heads=text.num_attention_heads,
                      num_kv_heads=text.num_key_value_heads, head_dim=head_dim,
                      intermediate_size=text.intermediate_size, vocab_size=target.vocab_size,
                      feature_layers=tuple(sorted({min(2, L), max(1, L // 2), max(1, L - 3)})),
                      window=0 if visual_kv else 48, n_anchor=0 if visual_kv else 16, visual_kv=visual_kv)
    torch.manual_seed(1)
    return SparrowDraft.from_target(cfg, target)


def time_draft_phase(draft, entries: int, tree, accepted: int, device) -> float:
    """ms of one draft phase: build_tree from a cache of `entries` committed entries, then the
    extend of `accepted` entries after verification (the cache is reset between calls)."""
    from sparrow_kernels.speculative.tree import build_tree

    nodes, scratch = tree.size(draft.config.vocab_size)
    cache = draft.new_cache(1, entries + accepted + scratch + 1)
    cache.k[:, :, :entries].normal_()
    cache.v[:, :, :entries].normal_()
    H, F = draft.config.hidden_size, draft.config.feature_size
    root = torch.tensor([5], device=device)
    root_hidden = torch.randn(1, H, device=device, dtype=draft.dtype)
    tokens = torch.randint(0, draft.config.vocab_size, (1, accepted), device=device)
    features = torch.randn(1, accepted, F, device=device, dtype=draft.dtype)
    valid = torch.tensor([accepted], device=device)

    def phase():
        cache.lengths.fill_(entries)
        build_tree(draft, cache, root, root_hidden, tree)
        draft.extend(cache, tokens, features, valid)
    return bench_ms(phase, device)


def measure_tau(lengths, tree, device, videos: int, tokens: int) -> dict:
    """Greedy tau of the committed sparrow / visual_kv drafts on the tiny video LM with this tree."""
    sys.path.insert(0, str(HERE))
    from e2e import video_prompt
    from sparrow_kernels.speculative.draft import SparrowDraft, committed_draft_dir
    from sparrow_kernels.speculative.engine import SparrowGenerator
    from sparrow_kernels.targets.tinyvlm import TinyVLMTarget

    target = TinyVLMTarget.load(device=device)
    out = {}
    for method in ("sparrow", "visual_kv"):
        draft = SparrowDraft.load(committed_draft_dir(method), target)
        gen = SparrowGenerator(target, draft, tree)
        for L in lengths:
            steps = accepted = 0
            for i in range(videos):
                res = gen.generate([video_prompt(target, L, i)], tokens)
                steps += res.stats.steps
                accepted += res.stats.tau * res.stats.steps
            out.setdefault(method, {})[str(L)] = accepted / max(steps, 1)
    return out


def tau_from_e2e(path: str, lengths: list[int]) -> dict:
    """{method: {length: greedy tau}} for sparrow / visual_kv from an e2e.py JSON."""
    greedy = json.loads(Path(path).read_text())["results"].get("0.0", {})   # the study's own tree: its meta
    out = {}
    for method in ("sparrow", "visual_kv"):
        for L in lengths:
            if str(L) not in greedy or method not in greedy[str(L)]:
                sys.exit(f"gpu_projection: {path} has no greedy tau of {method} at {L} visual tokens "
                         f"(lengths there: {sorted(greedy, key=int)})")
            out.setdefault(method, {})[str(L)] = greedy[str(L)][method]["tau"]
    return out


def fixed_tau(args, lengths: list[int]) -> tuple[dict, str | None]:
    """The tau given on the command line (--tau-from, then --tau over it) and its source label."""
    tau = tau_from_e2e(args.tau_from, lengths) if args.tau_from else {}
    given = {k: float(v) for k, v in (s.split("=", 1) for s in args.tau)}
    tau.update({m: {str(L): given[m] for L in lengths} for m in given})
    if not {"sparrow", "visual_kv"} <= set(tau):
        return tau, None
    study = ""
    if args.tau_from:
        tree = json.loads(Path(args.tau_from).read_text()).get("meta", {}).get("tree")
        study = f"e2e study {args.tau_from}" + (f" (its tree {tree})" if tree else "")
    parts = ([study] if study else []) + [f"fixed {k}={v}" for k, v in given.items()]
    return tau, ", ".join(parts)


def reproject(args) -> int:
    """The projection of saved timings recomputed with other tau values (draft-phase timings were
    taken with the accepted length of the original tau; that is the one input not redone)."""
    if args.out is None:
        sys.exit("gpu_projection: --reproject needs --out (the measured timings stay as they are)")
    saved = json.loads(Path(args.reproject).read_text())
    lengths = sorted({int(L) for rows in saved["results"].values() for L in rows})
    tau, source = fixed_tau(args, lengths)
    if source is None:
        sys.exit("gpu_projection: --reproject needs tau for sparrow and visual_kv (--tau-from and/or --tau)")
    nodes = str(saved["meta"]["tree_nodes"])
    for name, rows in saved["results"].items():
        for L, row in rows.items():
            row["tau"] = {m: tau[m][L] for m in ("sparrow", "visual_kv")}
            row["projected_decoding_speedup"] = {
                m: row["tau"][m] * row["decode_step_ms"] / (row["draft_phase_ms"][m] + row["verify_ms"][nodes])
                for m in ("sparrow", "visual_kv")}
            p = row["projected_decoding_speedup"]
            print(f"{name} visual={int(L):6d} tau {row['tau']['sparrow']:.2f} / {row['tau']['visual_kv']:.2f}  "
                  f"projected x{p['sparrow']:.2f} / x{p['visual_kv']:.2f}")
    saved["meta"].update(tau_source=source, reprojected_from=args.reproject, argv=sys.argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(saved, indent=1))
    print(f"gpu_projection: wrote {out}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.reproject:
        return reproject(args)
    from sparrow_kernels.speculative.tree import TreeShape

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lengths = [int(x) for x in args.visual_tokens.split(",")]
    node_counts = [int(x) for x in args.nodes.split(",")]
    tree = TreeShape(*map(int, args.tree.split(","))) if args.tree else TreeShape.for_device(device)
    tau, source = fixed_tau(args, lengths)
    if source is None:
        measured = measure_tau(lengths, tree, device, args.tau_videos, args.tau_tokens)
        tau = {**measured, **tau}
    dims = TINY if args.tiny else SEVEN_B
    results = {}
    with torch.inference_mode():
        for name in args.models.split(","):
            kind = MODELS[name]
            target = build_target(kind, dims, device, dtype)
            drafts = {"sparrow": make_draft(target, visual_kv=False), "visual_kv": make_draft(target, visual_kv=True)}
            layers = drafts["sparrow"].config.target_layers
            tree_nodes = tree.size(target.vocab_size)[0]
            rows = {}
            for L in lengths:
                state = synthetic_state(target, kind, L)
                one = torch.tensor([[5]], device=device)
                decode_ms = bench_ms(lambda: target.forward_tree(
                    state, one, torch.ones(1, 1, 1, dtype=torch.bool, device=device),
                    torch.zeros(1, 1, dtype=torch.long, device=device), ()), device)
                verify_ms = {}
                for n in sorted(set(node_counts + [tree_nodes])):
                    depth, mask = random_tree(n, device)
                    tokens = torch.randint(0, min(1000, target.vocab_size - 8), (1, n), device=device)
                    verify_ms[n] = bench_ms(lambda: target.forward_tree(state, tokens, mask, depth, layers), device)
                accepted = max(1, round(tau["sparrow"][str(L)]))
                draft_ms = {"sparrow": time_draft_phase(drafts["sparrow"], TEXT_ENTRIES, tree, accepted, device),
                            "visual_kv": time_draft_phase(drafts["visual_kv"], L + TEXT_ENTRIES, tree, accepted, device)}
                projected = {m: tau[m][str(L)] * decode_ms / (draft_ms[m] + verify_ms[tree_nodes]) for m in drafts}
                rows[str(L)] = {"decode_step_ms": decode_ms, "verify_ms": {str(k): v for k, v in verify_ms.items()},
                                "draft_phase_ms": draft_ms, "tau": {m: tau[m][str(L)] for m in drafts},
                                "projected_decoding_speedup": projected}
                print(f"{name} visual={L:6d} decode {decode_ms:7.2f} ms  verify N={tree_nodes} "
                      f"{verify_ms[tree_nodes]:7.2f} ms  draft sparrow {draft_ms['sparrow']:6.2f} / visual-KV "
                      f"{draft_ms['visual_kv']:6.2f} ms  projected x{projected['sparrow']:.2f} / "
                      f"x{projected['visual_kv']:.2f}", flush=True)
                del state
            results[name] = rows
            del target, drafts
            if device.type == "cuda":
                torch.cuda.empty_cache()
    meta = {"machine": platform.node(), "device": torch.cuda.get_device_name() if device.type == "cuda" else
            (platform.processor() or platform.machine()), "torch": torch.__version__, "dtype": str(dtype),
            "shapes": dims, "tree": tree.as_dict(), "tree_nodes": tree_nodes, "text_entries": TEXT_ENTRIES,
            "tau_source": source or "tiny video LM, this tree",
            "argv": sys.argv, "label": "projection: tau x decode step / (draft phase + tree verification)"}
    out = Path(args.out or HERE / "results" / "gpu_projection.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"gpu_projection: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
