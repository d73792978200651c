"""Caption accuracy of the tiny video LM: the fraction of facts its greedy detailed caption
states correctly (false statements count as wrong facts, see data.synthetic.score_caption)
on held-out synthetic videos rendered at 0.5k, 1.5k, 6k, 12k and 25k visual tokens (the
same videos, sampled more densely), with a per-kind breakdown, prefill time and decode
time per step. Prints a table and writes JSON; it never trains or changes a checkpoint.

    python benchmarks/caption_accuracy.py [--checkpoint DIR] [--videos 16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
from collections import defaultdict

import torch

from sparrow_kernels.data.synthetic import VideoWorld, heldout_seed, parse_caption, score_caption
from sparrow_kernels.targets.tinyvlm import TinyVLMTarget

VISUAL_TOKENS = (500, 1500, 6000, 12000, 25000)


def fact_kind(fact: tuple) -> str:
    return fact[0] if fact[0] == "count" else fact[1]


def per_kind_hits(text: str, world: VideoWorld) -> dict[str, list[int]]:
    """{fact kind: [correct, total]} for one caption (objects matched as in score_caption)."""
    facts = world.facts
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    count, predicted = parse_caption(text)
    out["count"] = [int(count == facts.count), 1]
    # greedy per-object matching by color+shape is enough for a breakdown
    unused = list(predicted)
    for obj in facts.objects:
        match = next((p for p in unused if p["color"] == obj.color and p["shape"] == obj.shape), None)
        if match is None and unused:
            match = unused[0]
        if match is not None:
            unused.remove(match)
        checks = {"color": match is not None and match["color"] == obj.color,
                  "shape": match is not None and match["shape"] == obj.shape,
                  "direction": match is not None and match["direction"] == obj.direction}
        if obj.appears:
            checks["appears"] = match is not None and match["appears"]
        if obj.bounces:
            checks["bounces"] = match is not None and match["bounces"]
        if obj.new_color is not None:
            checks["turns"] = match is not None and match["turns"] == obj.new_color
        for kind, ok in checks.items():
            out[kind][0] += int(ok)
            out[kind][1] += 1
    return out


def timed_greedy(target: TinyVLMTarget, prompts, max_new_tokens: int):
    """Greedy decoding (the library's one plain decoder, autoregressive_generate), timing
    prefill and decode apart. Returns (token lists, prefill seconds, decode seconds, decode steps)."""
    from sparrow_kernels.speculative.engine import autoregressive_generate

    result = autoregressive_generate(target, prompts, max_new_tokens)
    stats = result.stats
    return result.tokens, stats.prefill_s, stats.decode_s, stats.steps


def measure(target: TinyVLMTarget, visual_tokens: int, seeds: list[int], batch_size: int,
            max_new_tokens: int) -> dict:
    frames = target.frames_for(visual_tokens)
    correct = total = gt_total = 0
    kinds: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    prefill_s, decode_s, decode_tokens = 0.0, 0.0, 0
    examples = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        prompts = [target.world_prompt(s, frames) for s in chunk]
        outputs, t_prefill, t_decode, steps = timed_greedy(target, prompts, max_new_tokens)
        prefill_s += t_prefill
        decode_s += t_decode
        decode_tokens += steps
        for s, ids in zip(chunk, outputs):
            text = target.tokenizer.decode(ids)
            world = VideoWorld(s)
            c, t = score_caption(text, world.facts)
            correct, total = correct + c, total + t
            gt_total += len(world.facts.fact_list())
            for kind, (kc, kt) in per_kind_hits(text, world).items():
                kinds[kind][0] += kc
                kinds[kind][1] += kt
            if len(examples) < 3:
                examples.append({"seed": s, "truth": world.caption, "caption": text})
    n_batches = (len(seeds) + batch_size - 1) // batch_size
    return {"visual_tokens": target.visual_tokens_for(frames), "frames": frames, "videos": len(seeds),
            "facts_correct": correct, "facts_total": total, "accuracy": correct / max(total, 1),
            "recall": correct / max(gt_total, 1), "false_statements": total - gt_total,
            "by_kind": {k: v[0] / v[1] for k, v in sorted(kinds.items())},
            "prefill_s_per_batch": prefill_s / n_batches, "batch_size": batch_size,
            "decode_ms_per_step": 1000 * decode_s / max(decode_tokens, 1), "examples": examples}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="tiny VLM directory (default: the committed one)")
    p.add_argument("--videos", type=int, default=16, help="held-out videos per length")
    p.add_argument("--first-video", type=int, default=0, help="index of the first held-out video")
    p.add_argument("--visual-tokens", type=int, nargs="+", default=list(VISUAL_TOKENS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    target = TinyVLMTarget.load(args.checkpoint)
    seeds = [heldout_seed(args.first_video + i) for i in range(args.videos)]
    rows = []
    print(f"{'visual tokens':>13} {'frames':>6} {'facts':>9} {'accuracy':>8} {'count':>6} {'color':>6} "
          f"{'shape':>6} {'dir':>6} {'appear':>6} {'bounce':>6} {'turns':>6} {'false':>5} {'prefill s':>9} {'decode ms':>9}")
    for vt in args.visual_tokens:
        r = measure(target, vt, seeds, args.batch_size, args.max_new_tokens)
        rows.append(r)
        k = r["by_kind"]
        print(f"{r['visual_tokens']:>13} {r['frames']:>6} {r['facts_correct']:>4}/{r['facts_total']:<4} "
              f"{r['accuracy']:>8.1%} " + " ".join(f"{k.get(n, float('nan')):>6.0%}" for n in
                                                   ("count", "color", "shape", "direction", "appears", "bounces", "turns"))
              + f" {r['false_statements']:>5} {r['prefill_s_per_batch']:>9.2f} {r['decode_ms_per_step']:>9.1f}", flush=True)
    result = {"benchmark": "caption_accuracy", "checkpoint": str(args.checkpoint or "committed"),
              "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
