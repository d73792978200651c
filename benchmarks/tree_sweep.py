"""Tree-shape sweep: decoding speedup of one draft for several (total_tokens, depth, top_k)
settings at a few visual lengths, against autoregressive decoding measured in the same run.

Each video is prefilled once (the prefill is not what a tree shape changes) and every method
decodes from a copy of that state, so a sweep at 25k visual tokens costs seconds per setting,
not a 25k prefill each. Rounds interleave AR and every tree; times are the fastest of
`--repeats` rounds; speedup = AR seconds per
token / seconds per token (decode phase only). It measures; it asserts nothing.

    python benchmarks/tree_sweep.py                                   # default draft, CPU shapes
    python benchmarks/tree_sweep.py --trees 10,3,3 12,5,2 20,6,3 --visual-tokens 500,25000
    python benchmarks/tree_sweep.py --target qwen2_5_vl_world --visual-tokens 500,1500 --max-new-tokens 256
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_TREES = ("10,3,3", "12,5,2", "16,5,3", "14,6,2", "20,6,3", "16,7,2", "24,7,3", "8,6,1")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="tiny", help="'tiny', 'qwen2_5_vl_world' or a target directory (as e2e.py)")
    ap.add_argument("--draft", default=None,
                    help="committed draft name or a draft directory (default: the committed target's default draft)")
    ap.add_argument("--trees", nargs="+", default=list(DEFAULT_TREES), metavar="TOTAL,DEPTH,TOPK")
    ap.add_argument("--visual-tokens", default="500,25000")
    ap.add_argument("--videos", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(HERE / "results" / "tree_sweep.json"))
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from e2e import PrefillOnce, video_prompt
    from sparrow_kernels.speculative.draft import SparrowDraft, committed_draft_dir
    from sparrow_kernels.speculative.engine import SparrowGenerator, autoregressive_generate
    from sparrow_kernels.speculative.tree import TreeShape
    from sparrow_kernels.targets import committed_target, load_target
    from sparrow_kernels.targets.decoding import kv_capacity

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    trees = [TreeShape(*map(int, t.split(","))) for t in args.trees]
    target = load_target(args.target)
    owner = committed_target(args.target)
    if args.draft is None and owner is None:
        raise SystemExit("tree_sweep: --draft DIR is needed for a target that has no committed drafts")
    name = args.draft or committed_draft_dir(None, owner)
    draft = SparrowDraft.load(name if Path(name).is_dir() else committed_draft_dir(name, owner), target)
    lengths = [int(x) for x in args.visual_tokens.split(",")]
    results = {}
    for L in lengths:
        prompts = [video_prompt(target, L, i) for i in range(args.videos)]
        longest = max(target.prompt_lengths(prompts))
        capacity = kv_capacity(longest, args.max_new_tokens, tree_nodes=max(t.total_tokens for t in trees))
        cached = PrefillOnce(target, draft.config.target_layers, capacity)

        methods = {"autoregressive": lambda p: autoregressive_generate(cached, [p], args.max_new_tokens)}
        for tree in trees:
            gen = SparrowGenerator(cached, draft, tree)
            methods[str(tree)] = \
                lambda p, gen=gen: gen.generate([p], args.max_new_tokens)
        # per video, `repeats` interleaved rounds of every method (AR and each tree back to back,
        # so a slow spell of a shared machine hits them alike); the fastest decode per method is kept
        totals = {m: {"decode_s": 0.0, "tokens": 0, "steps": 0, "tau_sum": 0.0, "draft_s": 0.0, "verify_s": 0.0,
                      "bookkeeping_s": 0.0, "outputs": []} for m in methods}
        for prompt in prompts:
            fastest: dict = {}
            for _ in range(args.repeats):
                for m, run in methods.items():
                    res = run(prompt)
                    if m not in fastest or res.stats.decode_s < fastest[m].stats.decode_s:
                        fastest[m] = res
            for m, res in fastest.items():
                s, t = res.stats, totals[m]
                t["decode_s"] += s.decode_s
                t["tokens"] += len(res.tokens[0]) - 1                 # the first token comes from the prefill
                t["steps"] += s.steps
                t["tau_sum"] += s.tau * s.steps
                t["draft_s"] += s.draft_s
                t["verify_s"] += s.verify_s
                t["bookkeeping_s"] += s.bookkeeping_s
                t["outputs"].append(res.tokens[0])
        ar = totals["autoregressive"]
        ar_per_token = ar["decode_s"] / max(ar["tokens"], 1)
        rows = {}
        for tree in trees:
            key = str(tree)
            r = totals[key]
            steps = max(r["steps"], 1)
            row = {"tau": r["tau_sum"] / steps,
                   "speedup": ar_per_token / (r["decode_s"] / max(r["tokens"], 1)),
                   "draft_ms_per_step": 1e3 * r["draft_s"] / steps, "verify_ms_per_step": 1e3 * r["verify_s"] / steps,
                   "other_ms_per_step": 1e3 * r["bookkeeping_s"] / steps, "tokens": r["tokens"], "steps": r["steps"],
                   "same_as_ar": r["outputs"] == ar["outputs"]}
            rows[key] = row
            print(f"visual={L:6d} tree={key:<8} tau {row['tau']:5.2f}  decode x{row['speedup']:5.2f}  "
                  f"draft {row['draft_ms_per_step']:5.2f} verify {row['verify_ms_per_step']:6.2f} other "
                  f"{row['other_ms_per_step']:5.2f} ms/step, {row['tokens']} tokens in {row['steps']} steps  "
                  f"(AR {1e3 * ar_per_token:6.2f} ms/token)  same_as_ar={row['same_as_ar']}", flush=True)
        results[str(L)] = {"ar_ms_per_token": 1e3 * ar_per_token, "trees": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.node(), "cpu": platform.processor() or platform.machine(), "target": args.target,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "draft": name, "videos": args.videos,
            "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "argv": sys.argv}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"tree_sweep: wrote {out}")
    return 0 if all(r["same_as_ar"] for res in results.values() for r in res["trees"].values()) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
