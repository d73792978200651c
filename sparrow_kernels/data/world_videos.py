"""Narrated worlds (world.py) written as ordinary video files plus a prompt list, the form in which
a user brings their own clips and questions: `sparrow train-draft --target DIR --data pairs.json`
and the studies read them exactly as they would read a user's. Training worlds use seeds below
10**9, held-out ones `heldout_world_seed` (e2e.py's study clips are held-out 7000 + i; keep draft
evaluation sets elsewhere, e.g. from 7100). It writes files only; it must not import models.

    python -m sparrow_kernels.data.world_videos --out runs/world_clips --count 200
    python -m sparrow_kernels.data.world_videos --out runs/world_heldout --count 8 --heldout --first 7100
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from .narration import NARRATION_PROMPTS, QUESTION_KINDS, SUMMARY_PROMPTS, make_question
from .video_io import write_video
from .world import World, heldout_world_seed

PAIRS_NAME = "pairs.json"


def even_frames(rng: random.Random, low: int, high: int) -> int:
    """An even frame count, log-uniform in [low, high] (the temporal patch takes frames in pairs)."""
    value = math.exp(rng.uniform(math.log(max(2, low)), math.log(max(2, high))))
    return max(2, 2 * round(value / 2))


def world_prompt(world: World, rng: random.Random, narration_fraction: float, summary_fraction: float) -> str:
    """A detailed-narration request, a summary request or one of the question kinds."""
    draw = rng.random()
    if draw < narration_fraction:
        return rng.choice(NARRATION_PROMPTS)
    if draw < narration_fraction + summary_fraction:
        return rng.choice(SUMMARY_PROMPTS)
    for _ in range(len(QUESTION_KINDS) * 2):
        qa = make_question(world, rng.choice(QUESTION_KINDS), rng)
        if qa is not None:
            return qa.question
    return rng.choice(NARRATION_PROMPTS)


def write_world_clips(out: str | Path, count: int, first: int = 0, heldout: bool = False, seed: int = 0,
                      fps: float = 24.0, size: int = 112, frames_min: int = 8, frames_max: int = 128,
                      narration_fraction: float = 0.7, summary_fraction: float = 0.1) -> Path:
    """Write `count` worlds as `clip_<seed>.mp4` (H.264 4:4:4, near-lossless) at `fps` and
    `size`^2 pixels, and `pairs.json`: one {video, prompt, num_frames, world_seed} per clip, the
    frame count each request samples drawn log-uniform in [frames_min, frames_max] (capped at
    the clip's frames). Returns the pairs file."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if size % 28:
        raise ValueError(f"size must be a multiple of 28 pixels (Qwen2.5-VL's merged patch), got {size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed * 1_000_003 + first + (1 << 40 if heldout else 0))
    entries = []
    for i in range(first, first + count):
        world_seed = heldout_world_seed(i) if heldout else rng.randrange(10**9)
        world = World(world_seed)
        total = max(2, round(world.duration * fps))
        path = out / f"clip_{world_seed}.mp4"
        write_video(path, world.render(total, size), total / world.duration)
        entries.append({"video": str(path.resolve()), "prompt": world_prompt(world, rng, narration_fraction,
                                                                               summary_fraction),
                        "num_frames": min(total - total % 2, even_frames(rng, frames_min, frames_max)),
                        "world_seed": world_seed})
    pairs = out / PAIRS_NAME
    pairs.write_text(json.dumps(entries, indent=1))
    return pairs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparrow_kernels.data.world_videos", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--first", type=int, default=0, help="index of the first world (held-out index with --heldout)")
    p.add_argument("--heldout", action="store_true", help="held-out world seeds (evaluation)")
    p.add_argument("--seed", type=int, default=0, help="draws the training worlds, prompts and frame counts")
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--frames-min", type=int, default=8)
    p.add_argument("--frames-max", type=int, default=128)
    p.add_argument("--narration-fraction", type=float, default=0.7)
    p.add_argument("--summary-fraction", type=float, default=0.1)
    args = p.parse_args(argv)
    pairs = write_world_clips(args.out, args.count, args.first, args.heldout, args.seed, args.fps, args.size,
                              args.frames_min, args.frames_max, args.narration_fraction, args.summary_fraction)
    print(f"wrote {args.count} clips and {pairs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
