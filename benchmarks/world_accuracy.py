"""Accuracy of a Qwen2.5-VL checkpoint trained on the narrated world (train-target --target-kind
qwen2_5_vl): greedy answers through the stock HF `generate` on held-out test videos (held-out
indices from --first-video, apart from the validation videos at 5000+) rendered at several
visual-token budgets (the same clips, sampled more densely): narration facts per kind, summary
facts, QA accuracy per question kind, answer lengths in tokens. Prints a table and can write
JSON; it never trains or changes a checkpoint.

    python benchmarks/world_accuracy.py --target sparrow_kernels/checkpoints/qwen2_5_vl_world \
        [--videos 8] [--visual-tokens 512,6144,25000] [--qa 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from sparrow_kernels.data.narration import (QUESTION_KINDS, SUMMARY_PROMPTS, fact_fraction, make_question,
                                            score_answer, score_narration, score_summary, timestamps_close)
from sparrow_kernels.data.world import World, heldout_world_seed
from sparrow_kernels.training.train_qwen import EVAL_PROMPT, generate_answer

DEFAULT_TARGET = Path(__file__).resolve().parents[1] / "sparrow_kernels" / "checkpoints" / "qwen2_5_vl_world"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default=str(DEFAULT_TARGET), help="HF model directory")
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--first-video", type=int, default=0, help="first held-out index (test videos start at 0)")
    p.add_argument("--visual-tokens", default="512,6144,25000", help="comma-separated budgets")
    p.add_argument("--frame-size", type=int, default=112, help="frame size in pixels (a multiple of 28)")
    p.add_argument("--qa", type=int, default=1, help="questions per kind per video (0: narration only)")
    p.add_argument("--summary", action="store_true", help="also score a short summary per video")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def add(acc: dict, scores: dict) -> None:
    for kind, (found, total) in scores.items():
        a = acc.setdefault(kind, [0, 0])
        a[0] += found
        a[1] += total


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration  # noqa: PLC0415

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.target, dtype=torch.float32,
                                                               attn_implementation="sdpa", local_files_only=True)
    model.eval()
    tok = AutoProcessor.from_pretrained(args.target, local_files_only=True).tokenizer
    budgets = [int(x) for x in args.visual_tokens.split(",") if x]
    results = {}
    for budget in budgets:
        narr, summ, qa, stamps = {}, {}, {}, [0, 0]
        lengths, seconds, examples = [], 0.0, []
        for i in range(args.first_video, args.first_video + args.videos):
            world = World(heldout_world_seed(i))
            t0 = time.time()
            text = generate_answer(model, tok, world, EVAL_PROMPT, budget, args.frame_size, args.max_new_tokens)
            seconds += time.time() - t0
            lengths.append(len(tok.encode(text, add_special_tokens=False)))
            add(narr, score_narration(world, text))
            good, stated = timestamps_close(world, text)
            stamps[0] += good
            stamps[1] += stated
            if len(examples) < 2:
                examples.append(text)
            if args.summary:
                answer = generate_answer(model, tok, world, SUMMARY_PROMPTS[0], budget, args.frame_size, 96)
                add(summ, score_summary(world, answer))
            rng = random.Random(i)
            for kind in QUESTION_KINDS:
                for _ in range(args.qa):
                    item = make_question(world, kind, rng)
                    if item is None:
                        continue
                    answer = generate_answer(model, tok, world, item.question, budget, args.frame_size, 64)
                    add(qa, {kind: score_answer(world, item, answer)})
        results[budget] = {
            "narration_facts": fact_fraction({k: tuple(v) for k, v in narr.items()}),
            "narration_per_kind": narr, "timestamps_within_1s": stamps,
            "summary_facts": fact_fraction({k: tuple(v) for k, v in summ.items()}) if summ else None,
            "qa_per_kind": qa, "narration_tokens_mean": sum(lengths) / max(1, len(lengths)),
            "narration_seconds_mean": seconds / max(1, args.videos), "examples": examples}
        r = results[budget]
        kinds = "  ".join(f"{k} {v[0]}/{v[1]}" for k, v in narr.items())
        qas = "  ".join(f"{k} {v[0]}/{v[1]}" for k, v in qa.items())
        print(f"{budget:>6} visual tokens: narration facts {r['narration_facts']:.1%} ({kinds}); "
              f"timestamps {stamps[0]}/{stamps[1]}; QA {qas}; {r['narration_tokens_mean']:.0f} tokens, "
              f"{r['narration_seconds_mean']:.1f} s per narration", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"target": args.target, "videos": args.videos,
                                               "first_video": args.first_video, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
