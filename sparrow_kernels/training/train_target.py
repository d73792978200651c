"""`sparrow train-target`: train the built-in tiny video LM on the synthetic video world.

Data is generated on the fly from seeds (stateless: batch k is a function of the run seed
and k, so a resumed run sees exactly the batches it would have seen). fp32 by default
(bf16 autocast with --bf16: faster only on CPUs with native bf16), AdamW; the shared loop
(training/loop.py: cosine schedule, weight average, checkpoints, resume, export) runs it with
this module's batches, safetensors checkpoints with a config JSON and the tokenizer, and a quick
caption-accuracy eval on validation videos (held-out seeds from `--eval-first-video` on, apart
from the test videos that `benchmarks/caption_accuracy.py` scores) that keeps the best
checkpoint in OUT/best. It must not touch the committed checkpoint unless asked (`--export`).
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.synthetic import (CAPTION_QUESTION, VideoWorld, heldout_seed, question_text,
                              score_caption)
from ..data.tokenizer import WordTokenizer
from ..ops.threads import pick_threads
from ..targets.tinyvlm import TinyVLM, TinyVLMConfig, TinyVLMTarget
from .loop import TrainJob, checkpoint_dir, copy_files, resume_step, run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sparrow train-target", description=__doc__.split("\n")[0],
                                epilog="--target-kind qwen2_5_vl trains a stock Qwen2.5-VL on the narrated world "
                                       "instead (options: sparrow train-target --target-kind qwen2_5_vl --help)")
    p.add_argument("--out", default="runs/tinyvlm", help="run directory (checkpoints, log)")
    p.add_argument("--steps", type=int, default=6000, help="optimizer steps (sets the cosine schedule)")
    p.add_argument("--max-minutes", type=float, default=0, help="stop early after this wall time (0: no limit)")
    p.add_argument("--batch-tokens", type=int, default=3072, help="approximate tokens per batch")
    p.add_argument("--min-frames", type=int, default=4)
    p.add_argument("--max-frames", type=int, default=12)
    p.add_argument("--qa-min", type=int, default=2, help="fewest QA turns per training video")
    p.add_argument("--qa-max", type=int, default=6, help="most QA turns per training video")
    p.add_argument("--caption-prob", type=float, default=0.9,
                   help="probability that a training video's text includes its caption")
    p.add_argument("--vision-stem-channels", type=int, default=16,
                   help="channels of a full-resolution 3x3 conv stem in the vision encoder (0: none)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=384)
    p.add_argument("--visual-reference-frames", type=int, default=16,
                   help="density correction of visual attention for text queries (0: off); "
                        "see TinyVLMConfig.visual_reference_frames")
    p.add_argument("--checkpoint-minutes", type=float, default=4.0)
    p.add_argument("--eval-minutes", type=float, default=10.0)
    p.add_argument("--eval-videos", type=int, default=24)
    p.add_argument("--eval-first-video", type=int, default=5000,
                   help="first held-out index of the validation videos (the test videos of "
                        "benchmarks/caption_accuracy.py start at 0; keep the two apart)")
    p.add_argument("--ema", type=float, default=0.0,
                   help="decay of an exponential moving average of the weights (0: off); with it, the "
                        "evals, OUT/best and the export use the averaged weights")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: auto, 2 when the machine is idle, else 1; re-checked as it runs)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast (faster only on CPUs with native bf16, e.g. AVX512-BF16/AMX)")
    p.add_argument("--lr-by-time", action="store_true",
                   help="with --max-minutes: the cosine schedule follows wall time (whichever of steps and "
                        "minutes runs out first ends it), so a run on a busy machine still anneals")
    p.add_argument("--init", default=None,
                   help="start from the weights of this checkpoint directory (same architecture; fine-tuning)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last if it exists")
    p.add_argument("--export", default=None, help="also copy the final checkpoint to this directory")
    p.add_argument("--export-which", choices=("best", "last"), default="best",
                   help="which checkpoint --export copies: the best validation eval (default) or the last")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data

def make_sample(seed: int, num_frames: int, rng: random.Random, tok: WordTokenizer,
                qa_turns: tuple[int, int] = (1, 3), caption_prob: float = 0.75):
    """(frames [T, 32, 32, 3] uint8, text ids [L], loss mask [L]) for one training video:
    its caption (with probability `caption_prob`) and `qa_turns` (min, max) QA turns, in
    random order; loss on the answers only. More turns per video give more supervised
    tokens per visual token computed (visual tokens dominate the cost)."""
    world = VideoWorld(seed)
    qa = world.qa_pairs()
    turns = rng.sample(qa, k=min(len(qa), rng.randint(*qa_turns)))
    if rng.random() < caption_prob:
        turns.insert(rng.randint(0, len(turns)) if rng.random() < 0.5 else 0, (CAPTION_QUESTION, world.caption))
    ids, mask = [tok.bos_id], [0]
    for question, answer in turns:
        q_ids = tok.encode(question_text(question))
        a_ids = tok.encode(answer, add_eos=True)
        ids += q_ids + a_ids
        mask += [0] * len(q_ids) + [1] * len(a_ids)
    return world.render(num_frames), ids, mask


def make_batch(run_seed: int, step: int, args, tok: WordTokenizer, patches_per_frame: int):
    """The batch of `step`: one frame count for the whole batch, as many videos as fit
    `batch_tokens`. Returns frames [B, T, S, S, 3] uint8, ids [B, L], mask [B, L]."""
    rng = random.Random(run_seed * 1_000_003 + step)
    num_frames = rng.randint(args.min_frames, args.max_frames)
    text_tokens = 16 + 12 * (args.qa_min + args.qa_max) // 2 + 40 * args.caption_prob
    batch_size = max(2, int(args.batch_tokens // (num_frames * patches_per_frame + text_tokens)))
    turns = (args.qa_min, args.qa_max)
    samples = [make_sample(rng.randrange(10**9), num_frames, rng, tok, turns, args.caption_prob)
               for _ in range(batch_size)]
    L = max(len(s[1]) for s in samples)
    ids = torch.full((batch_size, L), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(batch_size, L, dtype=torch.bool)
    for b, (_, s_ids, s_mask) in enumerate(samples):
        ids[b, :len(s_ids)] = torch.tensor(s_ids)
        mask[b, :len(s_mask)] = torch.tensor(s_mask, dtype=torch.bool)
    return torch.stack([s[0] for s in samples]), ids, mask


# ----------------------------------------------------------------------------- eval

@torch.no_grad()
def caption_accuracy(model: TinyVLM, tok: WordTokenizer, num_frames: int, num_videos: int,
                     first_index: int = 0, batch_size: int = 16) -> float:
    """Fraction of ground-truth facts stated correctly in greedy captions of held-out videos
    `first_index` .. `first_index + num_videos - 1`."""
    target = TinyVLMTarget(copy.deepcopy(model).float(), tok)
    correct = total = 0
    for start in range(first_index, first_index + num_videos, batch_size):
        seeds = [heldout_seed(i) for i in range(start, min(start + batch_size, first_index + num_videos))]
        prompts = [target.world_prompt(s, num_frames) for s in seeds]
        outputs = target.generate_greedy(prompts, max_new_tokens=64)
        for s, ids in zip(seeds, outputs):
            c, t = score_caption(tok.decode(ids), VideoWorld(s).facts)
            correct, total = correct + c, total + t
    return correct / max(total, 1)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(directory: Path, model: TinyVLM, tok: WordTokenizer, optimizer=None, step: int = 0,
                    extra: dict | None = None, also=None) -> None:
    from safetensors.torch import save_file

    with checkpoint_dir(directory, optimizer, step, extra, also) as tmp:
        state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(model.cfg.to_json())
        tok.save(tmp / "tokenizer.json")


def export_checkpoint(src: Path, dst: Path) -> None:
    """Copy the inference files (no optimizer state) to `dst`."""
    copy_files(src, dst, ("model.safetensors", "config.json", "tokenizer.json"), required=True)


def set_threads(requested: int) -> None:
    """Fixed thread count, or (0) the load-aware rule the demo and generate use too
    (sparrow_kernels.ops.threads: 2 threads on an idle 2-core machine, 1 when it is busy)."""
    pick_threads(requested)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for k, arg in enumerate(argv):
        kind = argv[k + 1] if arg == "--target-kind" and k + 1 < len(argv) else \
            arg.split("=", 1)[1] if arg.startswith("--target-kind=") else None
        if kind is None:
            continue
        rest = argv[:k] + argv[k + (1 if "=" in arg else 2):]
        if kind == "qwen2_5_vl":
            from .train_qwen import main as train_qwen_main

            return train_qwen_main(rest)
        if kind == "tinyvlm":
            argv = rest
            break
        print(f"sparrow train-target: error: --target-kind must be tinyvlm or qwen2_5_vl, got {kind!r}",
              file=sys.stderr)
        return 2
    args = parse_args(argv)
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = WordTokenizer.from_grammar()
    cfg = TinyVLMConfig(vocab_size=tok.vocab_size, hidden_size=args.hidden_size, num_layers=args.layers,
                        num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.hidden_size // args.heads,
                        intermediate_size=args.intermediate_size, pad_token_id=tok.pad_id,
                        visual_reference_frames=args.visual_reference_frames,
                        vision_stem_channels=args.vision_stem_channels,
                        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, video_token_id=tok.video_id)
    model = TinyVLM(cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    last = out / "last"
    if args.init:
        from safetensors.torch import load_file

        init = Path(args.init)
        init_cfg = TinyVLMConfig.from_dict(json.loads((init / "config.json").read_text()))
        if init_cfg != cfg:
            raise SystemExit(f"--init {init}: its config.json differs from the requested architecture "
                             f"({init_cfg} vs {cfg})")
        model.load_state_dict(load_file(str(init / "model.safetensors")))
        print(f"initialized from {init}", flush=True)
    step = 0
    if args.resume and (last / "model.safetensors").is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(last / "model.safetensors")))
        step = resume_step(last, optimizer)
        print(f"resumed from {last} at step {step}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny VLM: {n_params / 1e6:.2f}M parameters, vocab {tok.vocab_size}; training {args.steps} steps",
          flush=True)
    run(TinyVLMJob(model, tok, args), args, out, optimizer, step)
    return 0


class TinyVLMJob(TrainJob):
    """The tiny video LM's batches, loss, checkpoint files and caption eval for `loop.run`."""

    desc = "train-target"
    log_every = 25

    def __init__(self, model: TinyVLM, tok: WordTokenizer, args):
        self.model, self.tok, self.args = model, tok, args

    def make_batch(self, step: int):
        return make_batch(self.args.seed, step, self.args, self.tok, self.model.cfg.patches_per_frame)

    def losses(self, batch):
        frames, ids, mask = batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.args.bf16):
            logits = self.model.forward_train(frames, ids)                          # [B, L, V]
        labels = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, self.model.cfg.vocab_size), labels.reshape(-1),
                               ignore_index=-100)
        return loss, loss, {}

    def tokens(self, batch) -> int:
        frames, ids, _ = batch
        return frames.shape[0] * (frames.shape[1] * self.model.cfg.patches_per_frame + ids.shape[1])

    def save(self, directory: Path, optimizer, step: int, extra: dict, also=None) -> None:
        save_checkpoint(directory, self.model, self.tok, optimizer, step, extra, also)

    def evaluate(self) -> tuple[dict, float]:
        acc = {f: caption_accuracy(self.model, self.tok, f, self.args.eval_videos, self.args.eval_first_video)
               for f in (31, 94)}
        return {"eval_caption_facts": {str(k): round(v, 4) for k, v in acc.items()}}, sum(acc.values()) / len(acc)

    def export(self, source: Path, destination: Path) -> None:
        export_checkpoint(source, destination)

    def on_log(self) -> None:
        set_threads(self.args.threads)


if __name__ == "__main__":
    raise SystemExit(main())
