"""A stock HF target's decode step and tree verification by attention implementation.

Times the Qwen2.5-VL adapter's `forward_tree` (the engine's verification step: the stock
`Qwen2_5_VLForConditionalGeneration` over a transformers cache of L tokens, random weights and
random K/V, costs do not depend on the values) with `attn_implementation` "sparrow"
(`torch.ops.sparrow.window_attn` behind transformers' AttentionInterface, the tree passed as
structure), "sdpa" and "eager" (both with the adapter's dense float tree mask), at L = 0.5k .. 25k
cached tokens, for one node (a plain decode step) and for N-node trees. Every row also records the
largest logit difference to "sdpa" (exactness, not speed). Timing: median wall-clock over
interleaved rounds on the CPU (every implementation once per round), `triton.testing.do_bench` on
CUDA (helpers shared with gpu_projection.py). It asserts nothing.

    python benchmarks/hf_attention.py                              # CPU: 8-layer d=256 LM, 0.5k..25k
    python benchmarks/hf_attention.py --device cuda --shapes 7b    # Qwen2.5-VL-7B LM shapes (a lent GPU)
    python benchmarks/hf_attention.py --quick                      # the code path on tiny shapes (tests)
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gpu_projection import SEVEN_B, TINY, bench_ms, build_target, random_tree, synthetic_state  # noqa: E402

# the CPU study's real-architecture target: an 8-layer d=256 Qwen2.5-VL language model
SMALL = dict(num_layers=8, num_heads=8, num_kv_heads=2, head_dim=32, intermediate_size=1024, vocab_size=8192)
SHAPES = {"small": SMALL, "7b": SEVEN_B, "tiny": TINY}
IMPLEMENTATIONS = ("sparrow", "sdpa", "eager")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=list(SHAPES), default="small")
    ap.add_argument("--lengths", default="500,1500,6000,12000,25000", help="cached tokens L (comma list)")
    ap.add_argument("--nodes", default="1,12", help="tree sizes N (1 = a decode step); 12 = the CPU tree")
    ap.add_argument("--impls", default=",".join(IMPLEMENTATIONS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds (each times every impl once)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, L = 64,256, N = 1,4: the code path only")
    ap.add_argument("--out", default=str(HERE / "results"))
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dims = SHAPES["tiny" if args.quick else args.shapes]
    lengths = [64, 256] if args.quick else [int(x) for x in args.lengths.split(",")]
    node_counts = [1, 4] if args.quick else [int(x) for x in args.nodes.split(",")]
    if args.rounds < 1:
        print(f"hf_attention: --rounds must be >= 1, got {args.rounds}", file=sys.stderr)
        return 2
    impls = args.impls.split(",")
    unknown = sorted(set(impls) - set(IMPLEMENTATIONS))
    if unknown:
        print(f"hf_attention: --impls must be a comma list of {', '.join(IMPLEMENTATIONS)}, got {unknown}",
              file=sys.stderr)
        return 2
    rows = []
    with torch.inference_mode():
        target = build_target("qwen", dims, device, dtype)
        for length in lengths:
            state = synthetic_state(target, "qwen", length)
            for nodes in node_counts:
                depth, mask = random_tree(nodes, device)
                tokens = torch.randint(0, min(1000, target.vocab_size - 8), (1, nodes), device=device)
                logits, row = {}, {"cached_tokens": length, "nodes": nodes}
                def step(state=state, tokens=tokens, mask=mask, depth=depth):
                    return target.forward_tree(state, tokens, mask, depth, ())
                for impl in impls:                              # warm-up and the exactness check
                    target.model.set_attn_implementation(impl)
                    logits[impl] = step().logits.float()
                times: dict[str, list[float]] = {impl: [] for impl in impls}
                for _ in range(args.rounds):                    # interleaved rounds: drift hits every impl alike
                    for impl in impls:
                        target.model.set_attn_implementation(impl)
                        times[impl].append(bench_ms(step, device, repeats=1))
                for impl in impls:
                    row[f"{impl}_ms"] = statistics.median(times[impl])
                reference = logits.get("sdpa")
                if reference is not None:
                    row["max_abs_logit_diff_vs_sdpa"] = {impl: float((value - reference).abs().max())
                                                         for impl, value in logits.items()}
                if "sparrow_ms" in row and "sdpa_ms" in row:
                    row["sdpa_over_sparrow"] = row["sdpa_ms"] / row["sparrow_ms"]
                rows.append(row)
                print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                                if not isinstance(v, dict)), flush=True)
            del state
    meta = {"machine": platform.node(), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            (platform.processor() or platform.machine()), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": __import__("transformers").__version__, "dtype": str(dtype),
            "shapes": dims, "model": "Qwen2_5_VLForConditionalGeneration (stock, random weights) via QwenVLTarget",
            "argv": sys.argv, "label": "median ms of one forward_tree (decode step for nodes=1) over interleaved rounds",
            "rounds": args.rounds}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "hf_attention_quick" if args.quick else f"hf_attention_{args.shapes}_{device.type}"
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{name}.md").write_text(markdown(rows, impls))
    print(f"hf_attention: wrote {out / name}.json and .md")
    return 0


def markdown(rows: list[dict], impls: list[str]) -> str:
    head = "| cached tokens | nodes | " + " | ".join(f"{impl} ms" for impl in impls) + " | sdpa / sparrow |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        ratio = row.get("sdpa_over_sparrow")
        lines.append(f"| {row['cached_tokens']} | {row['nodes']} | "
                     + " | ".join(f"{row[f'{impl}_ms']:.2f}" for impl in impls)
                     + f" | {'' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
