"""Tree-shape sweep: decoding speedup of one draft for several (total_tokens, depth, top_k)
settings at a few visual lengths, against autoregressive decoding measured in the same run.

Each video is prefilled once (the prefill is not what a tree shape changes) and every method
decodes from a copy of that state, so a sweep at 25k visual tokens costs seconds per setting,
not a 25k prefill each. Times are the fastest of `--repeats` rounds; speedup = AR seconds per
token / seconds per token (decode phase only). It measures; it asserts nothing.

    python benchmarks/tree_sweep.py                                   # default draft, CPU shapes
    python benchmarks/tree_sweep.py --trees 10,3,3 12,5,2 20,6,3 --visual-tokens 500,25000
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_TREES = ("10,3,3", "12,5,2", "16,5,3", "14,6,2", "20,6,3", "16,7,2", "24,7,3", "8,6,1")


class PrefillOnce:
    """A target whose prefill runs once per prompt (with every layer any caller asks for and a
    capacity large enough for all) and then hands out deep copies of that state; everything
    else is the wrapped target's."""

    def __init__(self, target, layers, capacity: int):
        self._target, self._layers, self._capacity = target, tuple(layers), capacity
        self._cache: dict = {}

    def __getattr__(self, name):
        return getattr(self._target, name)

    def prefill(self, prompts, layers, capacity):
        from sparrow_kernels.targets.base import PrefillOutput

        key = tuple(id(p) for p in prompts)
        if key not in self._cache:
            self._cache[key] = self._target.prefill(prompts, self._layers, max(capacity, self._capacity))
        full = self._cache[key]
        if capacity > full.state.capacity:
            raise ValueError(f"PrefillOnce: capacity {capacity} > the cached state's {full.state.capacity}")
        return PrefillOutput(state=copy.deepcopy(full.state), logits=full.logits,
                             hidden=[full.hidden[self._layers.index(l)] for l in layers],
                             input_ids=full.input_ids, text_mask=full.text_mask, lengths=full.lengths)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft", default=None, help="committed draft name or a draft directory (default: DEFAULT_DRAFT)")
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
    from e2e import video_prompt
    from sparrow_kernels.draft import DEFAULT_DRAFT, SparrowDraft, committed_draft_dir
    from sparrow_kernels.engine import SparrowGenerator, autoregressive_generate
    from sparrow_kernels.targets.tinyvlm import TinyVLMTarget

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    trees = [dict(zip(("total_tokens", "depth", "top_k"), map(int, t.split(",")))) for t in args.trees]
    target = TinyVLMTarget.load()
    name = args.draft or DEFAULT_DRAFT
    draft = SparrowDraft.load(name if Path(name).is_dir() else committed_draft_dir(name), target)
    lengths = [int(x) for x in args.visual_tokens.split(",")]
    results = {}
    for L in lengths:
        prompts = [video_prompt(target, L, i) for i in range(args.videos)]
        longest = max(target.prompt_lengths(prompts))
        cached = PrefillOnce(target, draft.config.target_layers, longest + args.max_new_tokens + 256)

        def best(run):                 # fastest decode of `repeats` rounds, summed over videos
            totals = {"decode_s": 0.0, "tokens": 0, "steps": 0, "tau_sum": 0.0, "draft_s": 0.0, "verify_s": 0.0,
                      "bookkeeping_s": 0.0, "same": True, "outputs": []}
            for prompt in prompts:
                rounds = [run(prompt) for _ in range(args.repeats)]
                res = min(rounds, key=lambda r: r.stats.decode_s)
                s = res.stats
                totals["decode_s"] += s.decode_s
                totals["tokens"] += len(res.tokens[0]) - 1          # the first token comes from the prefill
                totals["steps"] += s.steps
                totals["tau_sum"] += s.tau * s.steps
                totals["draft_s"] += s.draft_s
                totals["verify_s"] += s.verify_s
                totals["bookkeeping_s"] += s.bookkeeping_s
                totals["outputs"].append(res.tokens[0])
            return totals

        ar = best(lambda p: autoregressive_generate(cached, [p], args.max_new_tokens))
        ar_per_token = ar["decode_s"] / max(ar["tokens"], 1)
        rows = {}
        for tree in trees:
            gen = SparrowGenerator(cached, draft, **tree)
            r = best(lambda p: gen.generate([p], args.max_new_tokens))
            steps = max(r["steps"], 1)
            row = {"tau": r["tau_sum"] / steps,
                   "speedup": ar_per_token / (r["decode_s"] / max(r["tokens"], 1)),
                   "draft_ms_per_step": 1e3 * r["draft_s"] / steps, "verify_ms_per_step": 1e3 * r["verify_s"] / steps,
                   "other_ms_per_step": 1e3 * r["bookkeeping_s"] / steps, "tokens": r["tokens"], "steps": r["steps"],
                   "same_as_ar": r["outputs"] == ar["outputs"]}
            key = "{total_tokens},{depth},{top_k}".format(**tree)
            rows[key] = row
            print(f"visual={L:6d} tree={key:<8} tau {row['tau']:5.2f}  decode x{row['speedup']:5.2f}  "
                  f"draft {row['draft_ms_per_step']:5.2f} verify {row['verify_ms_per_step']:6.2f} other "
                  f"{row['other_ms_per_step']:5.2f} ms/step, {row['tokens']} tokens in {row['steps']} steps  "
                  f"(AR {1e3 * ar_per_token:6.2f} ms/token)  same_as_ar={row['same_as_ar']}", flush=True)
        results[str(L)] = {"ar_ms_per_token": 1e3 * ar_per_token, "trees": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.node(), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "draft": name, "videos": args.videos,
            "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "argv": sys.argv}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"tree_sweep: wrote {out}")
    return 0 if all(r["same_as_ar"] for res in results.values() for r in res["trees"].values()) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
