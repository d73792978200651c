"""`sparrow train-target --target-kind qwen2_5_vl`: train a stock `Qwen2_5_VLForConditionalGeneration`
from scratch on the narrated world (data/world.py, data/narration.py) through the unmodified HF
forward, with the world's BPE tokenizer and a Qwen chat template. Batches are stateless functions of
(run seed, step), so a resumed run sees the batches it would have seen; videos use time-aligned
M-RoPE (`second_per_grid_ts` = 2 / fps), so any frame count of a clip spans the same temporal
positions. Keeps OUT/last (resume), OUT/best (validation narration facts) and exports a standard
HF model directory. It must not patch modeling code, touch the committed checkpoint unless asked
(`--export`), or download anything.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

from ..data.narration import (NARRATION_PROMPTS, QUESTION_KINDS, SUMMARY_PROMPTS, fact_fraction,
                              make_question, narration, score_narration, summary)
from ..data.world import COLORS, DIRECTIONS, SHAPES, SPEEDS, World, heldout_world_seed
from .loop import TrainJob, WeightAverage, checkpoint_dir, copy_files, resume_step, run
from .train_target import set_threads

PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json",
                   "preprocessor_config.json", "video_preprocessor_config.json", "special_tokens_map.json")
HF_FILES = ("config.json", "generation_config.json", "model.safetensors") + PROCESSOR_FILES
EVAL_PROMPT = NARRATION_PROMPTS[0]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sparrow train-target --target-kind qwen2_5_vl",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/qwen_world", help="run directory (last/, best/, tokenizer/, log)")
    p.add_argument("--steps", type=int, default=20000, help="optimizer steps (sets the cosine schedule)")
    p.add_argument("--max-minutes", type=float, default=0, help="stop after this wall time (0: no limit)")
    p.add_argument("--lr-by-time", action="store_true",
                   help="with --max-minutes: the cosine schedule also follows wall time")
    p.add_argument("--batch-tokens", type=int, default=2400, help="approximate tokens (text + visual) per batch")
    p.add_argument("--frame-sizes", default="84,112", help="frame sizes (pixels, multiples of 28) drawn per batch")
    p.add_argument("--min-frames", type=int, default=8)
    p.add_argument("--max-frames", type=int, default=48)
    p.add_argument("--max-visual-tokens", type=int, default=384, help="fewer frames when a batch would exceed it")
    p.add_argument("--narration-prob", type=float, default=0.8, help="chance a training chat includes a narration")
    p.add_argument("--summary-prob", type=float, default=0.3)
    p.add_argument("--qa-min", type=int, default=1)
    p.add_argument("--qa-max", type=int, default=3)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--vision-lr-scale", type=float, default=1.0,
                   help="learning-rate multiplier of the vision tower and merger")
    p.add_argument("--visual-norm-weight", type=float, default=0.0,
                   help="weight of a penalty keeping the visual tokens' mean norm at the text embeddings' (0: off)")
    p.add_argument("--grounding-weight", type=float, default=0.0,
                   help="weight of the training-only grounding probe: a linear head on each visual token "
                        "predicts the colours, shapes, directions and speeds of the objects in its cell (0: off)")
    p.add_argument("--probe", choices=("linear", "words"), default="words",
                   help="grounding probe: a linear head, or the class words' own (tied) embeddings")
    p.add_argument("--stage", choices=("joint", "tower"), default="joint",
                   help="joint: answers through the whole model (default); tower: pretrain only the vision tower "
                        "and merger on the grounding probe (videos, no text; the language model is frozen), "
                        "as a real VLM starts from a pretrained vision encoder. Needs --grounding-weight > 0")
    p.add_argument("--tower-videos", type=int, default=8, help="--stage tower: videos per batch")
    p.add_argument("--data-workers", type=int, default=1,
                   help="processes that render the next batches while a step trains (0: inline)")
    p.add_argument("--reinit-vision", action="store_true",
                   help="with --init: fresh vision tower and merger weights (keeps the language model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=768)
    p.add_argument("--rope-theta", type=float, default=100.0,
                   help="small, so the height/width M-RoPE sections of a small head still turn per position")
    p.add_argument("--vision-depth", type=int, default=2)
    p.add_argument("--vision-hidden-size", type=int, default=96)
    p.add_argument("--vision-heads", type=int, default=3)
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary (built when OUT/tokenizer is missing)")
    p.add_argument("--tokenizer-worlds", type=int, default=3000, help="worlds whose text trains the BPE")
    p.add_argument("--tokenizer", default=None, help="use this tokenizer/processor directory instead of building one")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--eval-minutes", type=float, default=20.0)
    p.add_argument("--eval-videos", type=int, default=6)
    p.add_argument("--eval-first-video", type=int, default=5000,
                   help="first held-out index of the validation videos (test videos start at 0)")
    p.add_argument("--eval-visual-tokens", default="512,1536", help="visual-token budgets of the validation eval")
    p.add_argument("--eval-max-new-tokens", type=int, default=480)
    p.add_argument("--eval-frame-size", type=int, default=112, help="frame size (pixels) of the validation videos")
    p.add_argument("--ema", type=float, default=0.0, help="decay of a weight average used by evals and saves (0: off)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: auto)")
    p.add_argument("--init", default=None, help="start from the weights of this HF model directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last if it exists")
    p.add_argument("--export", default=None, help="copy the final model directory here")
    p.add_argument("--export-which", choices=("best", "last"), default="best")
    args = p.parse_args(argv)
    for name, value in (("--frame-sizes", args.frame_sizes), ("--eval-frame-size", str(args.eval_frame_size))):
        sizes = [x.strip() for x in str(value).split(",")]
        if not all(x.isdigit() and int(x) > 0 and int(x) % 28 == 0 for x in sizes):
            p.error(f"{name} must be positive multiples of 28 pixels (patch 14 x merge 2), got {value!r}")
    if args.stage == "tower" and args.grounding_weight <= 0:
        p.error("--stage tower trains the vision tower on the grounding probe: pass --grounding-weight > 0")
    return args


# ----------------------------------------------------------------------------- model

def build_config(args, tokenizer):
    """A stock `Qwen2_5_VLConfig` for this CPU; special ids come from the tokenizer."""
    from transformers import Qwen2_5_VLConfig  # noqa: PLC0415

    head_dim = args.hidden_size // args.heads
    if head_dim % 2 or args.hidden_size % args.heads:
        raise ValueError(f"--hidden-size / --heads must be an even integer, got {args.hidden_size}/{args.heads}")
    half = head_dim // 2
    mrope_section = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]   # 32 -> [6, 5, 5]
    ids = tokenizer.convert_tokens_to_ids
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta, "mrope_section": mrope_section},
        eos_token_id=ids("<|im_end|>"), bos_token_id=None, pad_token_id=ids("<|endoftext|>"),
        tie_word_embeddings=True)
    vision_config = dict(
        depth=args.vision_depth, hidden_size=args.vision_hidden_size, intermediate_size=2 * args.vision_hidden_size,
        num_heads=args.vision_heads, in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        out_hidden_size=args.hidden_size, window_size=112, fullatt_block_indexes=[args.vision_depth - 1],
        tokens_per_second=2)
    config = Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision_config, video_token_id=ids("<|video_pad|>"),
        image_token_id=ids("<|image_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"), eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"), tie_word_embeddings=True)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return config


# ----------------------------------------------------------------------------- data

def video_inputs(world: World, num_frames: int, size: int) -> dict:
    """(`pixel_values_videos [t*h*w, 1176]`, `video_grid_thw [1, 3]`, `second_per_grid_ts [1]`) of the
    world rendered at `num_frames` x `size`^2, normalized as Qwen's video processor does."""
    from ..targets.hf_qwen import CLIP_MEAN, CLIP_STD, qwen_video_patches  # noqa: PLC0415

    frames = torch.from_numpy(world.render(num_frames, size)).permute(0, 3, 1, 2).float() / 255.0   # [T, 3, H, W]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    patches, grid_thw = qwen_video_patches((frames - mean) / std, 2, 14, 2)
    seconds = torch.tensor([2.0 / world.fps(num_frames)], dtype=torch.float32)
    return {"pixel_values_videos": patches, "video_grid_thw": grid_thw, "second_per_grid_ts": seconds}


def frames_for_tokens(visual_tokens: int, size: int) -> int:
    """Even frame count whose video has about `visual_tokens` tokens at `size`^2 pixels."""
    per_grid = (size // 28) ** 2
    return max(2, 2 * round(visual_tokens / per_grid))


def chat_ids(tokenizer, turns: list[tuple[str, str | None]], video_tokens: int) -> tuple[list[int], list[int]]:
    """Token ids of a chat (the video in the first user turn) and a mask of the supervised ids
    (each assistant answer and its <|im_end|>). A last turn with answer None ends with the
    generation prompt. Equal to the chat template's text tokenized whole (tested)."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)   # noqa: E731
    video = "<|vision_start|>" + "<|video_pad|>" * video_tokens + "<|vision_end|>"
    ids: list[int] = []
    mask: list[int] = []
    for k, (question, answer) in enumerate(turns):
        head = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" if k == 0 else "")
        user = head + "<|im_start|>user\n" + (video if k == 0 else "") + question + "<|im_end|>\n<|im_start|>assistant\n"
        u = enc(user)
        ids += u
        mask += [0] * len(u)
        if answer is None:
            break
        a = enc(answer + "<|im_end|>")
        ids += a
        mask += [1] * len(a)
        nl = enc("\n")
        ids += nl
        mask += [0] * len(nl)
    return ids, mask


def make_turns(world: World, rng: random.Random, args) -> list[tuple[str, str]]:
    turns = []
    for _ in range(rng.randint(args.qa_min, args.qa_max)):
        qa = make_question(world, rng.choice(QUESTION_KINDS), rng)
        if qa is not None:
            turns.append((qa.question, qa.answer))
    if rng.random() < args.summary_prob:
        turns.insert(rng.randint(0, len(turns)), (rng.choice(SUMMARY_PROMPTS), summary(world, rng)))
    if rng.random() < args.narration_prob or not turns:
        at = 0 if rng.random() < 0.6 else rng.randint(0, len(turns))
        turns.insert(at, (rng.choice(NARRATION_PROMPTS), narration(world, rng)))
    return turns


def batch_rendering(rng: random.Random, args) -> tuple[int, int]:
    """(frame size, even frame count) of one batch: a size from `--frame-sizes`, a count in
    [--min-frames, --max-frames] cut to `--max-visual-tokens`."""
    size = rng.choice([int(s) for s in str(args.frame_sizes).split(",")])
    per_grid = (size // 28) ** 2
    num_frames = 2 * rng.randint(args.min_frames // 2, args.max_frames // 2)
    return size, min(num_frames, 2 * max(1, args.max_visual_tokens // per_grid))


def make_tower_batch(run_seed: int, step: int, args) -> dict:
    """`--stage tower`'s batch of `step` (a pure function of run seed and step): `--tower-videos`
    worlds at one frame size and count, their patches and grounding labels; no text."""
    rng = random.Random(run_seed * 1_000_003 + step)
    size, num_frames = batch_rendering(rng, args)
    worlds = [World(rng.randrange(10**9)) for _ in range(args.tower_videos)]
    videos = [video_inputs(w, num_frames, size) for w in worlds]
    return {"pixel_values_videos": torch.cat([v["pixel_values_videos"] for v in videos]),
            "video_grid_thw": torch.cat([v["video_grid_thw"] for v in videos]),
            "grounding_labels": torch.cat([grounding_labels(w, num_frames, size) for w in worlds])}


def make_batch(run_seed: int, step: int, args, tokenizer) -> dict:
    """The batch of `step` (a pure function of run seed and step): one frame size and count for
    all its videos, as many chats as fit `batch_tokens`. Returns stock forward kwargs + labels."""
    rng = random.Random(run_seed * 1_000_003 + step)
    size, num_frames = batch_rendering(rng, args)
    video_tokens = num_frames // 2 * (size // 28) ** 2
    rows, videos, grounding = [], [], []
    used = 0
    while True:
        world = World(rng.randrange(10**9))
        ids, mask = chat_ids(tokenizer, make_turns(world, rng, args), video_tokens)
        if rows and used + len(ids) > args.batch_tokens:
            break
        rows.append((ids, mask))
        videos.append(video_inputs(world, num_frames, size))
        grounding.append(grounding_labels(world, num_frames, size))
        used += len(ids)
        if len(rows) >= 16:
            break
    length = max(len(r[0]) for r in rows)
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    attention = torch.zeros(len(rows), length, dtype=torch.long)
    for b, (ids, mask) in enumerate(rows):
        t = torch.tensor(ids)
        input_ids[b, :len(ids)] = t
        labels[b, :len(ids)] = torch.where(torch.tensor(mask, dtype=torch.bool), t, torch.tensor(-100))
        attention[b, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
            "mm_token_type_ids": (input_ids == video_id).long() * 2,
            "pixel_values_videos": torch.cat([v["pixel_values_videos"] for v in videos]),
            "video_grid_thw": torch.cat([v["video_grid_thw"] for v in videos]),
            "second_per_grid_ts": torch.cat([v["second_per_grid_ts"] for v in videos]),
            "grounding_labels": torch.cat(grounding)}


TRAINING_ONLY_KEYS = ("labels", "grounding_labels")


def answer_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy of the supervised next tokens (the same value as the stock forward's
    `labels` loss); the stock forward computes logits only at the positions that predict one
    (`logits_to_keep`), not at the visual and prompt positions."""
    targets = batch["labels"][:, 1:]                                        # [B, L-1]
    keep = (targets != -100).any(0).nonzero().squeeze(1)                    # [K] positions p predicting p+1
    inputs = {k: v for k, v in batch.items() if k not in TRAINING_ONLY_KEYS}
    logits = model(**inputs, logits_to_keep=keep).logits                    # [B, K, V]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets[:, keep].flatten(),
                                             ignore_index=-100)


def param_groups(model, args) -> list[dict]:
    """AdamW groups: weight decay on matrices except embeddings; the vision tower (with its
    merger) at `--vision-lr-scale` times the learning rate. `--stage tower` trains only those."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        visual = ".visual." in f".{name}"
        if args.stage == "tower" and not visual:
            continue
        decayed = p.dim() >= 2 and "embed" not in name
        groups.setdefault((visual, decayed), []).append(p)
    return [{"params": params, "weight_decay": args.weight_decay if decayed else 0.0,
             "lr_scale": args.vision_lr_scale if visual else 1.0}
            for (visual, decayed), params in sorted(groups.items())]


def reinit_vision(model, seed: int = 0) -> None:
    """Fresh stock-initialised weights for the vision tower and merger (a new model of the same
    config supplies them); the language model keeps its weights."""
    from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: PLC0415

    torch.manual_seed(seed)
    fresh = Qwen2_5_VLForConditionalGeneration(model.config)
    model.model.visual.load_state_dict(fresh.model.visual.state_dict())


PROBE_CLASSES = tuple(COLORS) + tuple(SHAPES) + tuple(DIRECTIONS) + tuple(SPEEDS) + ("object",)
PROBE_POS_WEIGHT = 4.0
PROBE_FILE = "probe.safetensors"          # OUT/last only: the probe head is never part of the model
PROBE_GROUPS = {"color": tuple(COLORS), "shape": tuple(SHAPES), "direction": tuple(DIRECTIONS),
                "speed": tuple(SPEEDS), "object": ("object",)}


def grounding_labels(world: World, num_frames: int, size: int) -> torch.Tensor:
    """Multi-hot targets `[t*h*w, len(PROBE_CLASSES)]` of the video's merged visual tokens, in the
    vision tower's output order (time, row, column): for every object visible at the middle of a
    token's two frames whose center lies in the token's 28 x 28 cell, its color, shape, direction,
    speed and "object" at that time."""
    cells = size // 28
    times = world.frame_times(num_frames)
    if num_frames % 2:                                   # the patcher repeats the last frame
        times = np.append(times, times[-1])
    mids = times.reshape(-1, 2).mean(1)                  # [t]
    index = {name: i for i, name in enumerate(PROBE_CLASSES)}
    labels = np.zeros((len(mids), cells, cells, len(PROBE_CLASSES)), dtype=np.float32)
    for o in world.objects:
        centers = o.centers(mids)
        for k in np.nonzero(o.visible(mids))[0]:
            t = float(mids[k])
            col = min(cells - 1, max(0, int(centers[k, 0] * cells)))
            row = min(cells - 1, max(0, int(centers[k, 1] * cells)))
            segment = o.segment_at(t)
            for name in (o.color_at(t), o.shape_at(t), segment.direction, segment.speed, "object"):
                labels[k, row, col, index[name]] = 1.0
    return torch.from_numpy(labels.reshape(-1, len(PROBE_CLASSES)))


class WordProbe(torch.nn.Module):
    """Probe logits read in the language model's own word-embedding space: class c's logit is
    `scale * <token, E[id_c]> + bias_c`, with E the (tied) embedding rows of the class words
    (" red", " cross", " left", ...), detached. Training visual tokens against it pulls each token
    toward the embeddings of the words that describe its cell, a form the language model's copy
    circuits already read in text."""

    def __init__(self, model, tokenizer):
        super().__init__()
        ids = []
        for name in PROBE_CLASSES:
            encoded = tokenizer.encode(" " + name, add_special_tokens=False)
            if len(encoded) != 1:
                raise ValueError(f"--probe words needs ' {name}' to be one token of the tokenizer, got {encoded}")
            ids.append(encoded[0])
        self.register_buffer("ids", torch.tensor(ids), persistent=False)
        self.embeddings = [model.model.language_model.embed_tokens]
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.bias = torch.nn.Parameter(torch.zeros(len(PROBE_CLASSES)))

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        words = self.embeddings[0].weight[self.ids].detach()                  # [C, d]
        return self.scale * (visual @ words.t()) + self.bias


class VisualAuxLosses(torch.nn.Module):
    """Training-only losses on the visual tokens of the last training forward, read by a forward
    hook on the stock vision tower (no modeling code changed; nothing here is saved with the model):

    - norm: `norm_weight * log(mean visual-token norm / mean text-embedding norm)^2` keeps the
      visual embeddings at the text scale, where they cannot grow into one constant "sink" vector;
    - grounding: `probe_weight *` multi-label cross-entropy of a probe that reads, from each visual
      token, what lies in its cell (`grounding_labels`): a linear head, or (`tokenizer` given) a
      `WordProbe` in the word-embedding space. Without it the language model learns the
      narrations' prior long before the tower carries anything it could read.
    """

    def __init__(self, model, norm_weight: float, probe_weight: float, tokenizer=None):
        super().__init__()
        self.model, self.norm_weight, self.probe_weight = [model], norm_weight, probe_weight
        if probe_weight <= 0:
            self.head = None
        elif tokenizer is not None:
            self.head = WordProbe(model, tokenizer)
        else:
            self.head = torch.nn.Linear(model.config.vision_config.out_hidden_size, len(PROBE_CLASSES))
        self.outputs: list[torch.Tensor] = []
        model.model.visual.register_forward_hook(self._record)

    def _record(self, module, args, out) -> None:
        if torch.is_grad_enabled():                     # training forwards only (not evals, generate)
            self.outputs.append(out.pooler_output)

    def take(self, labels: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """The weighted losses of the visual tokens seen since the last call, and their stats."""
        outputs, self.outputs = self.outputs, []
        if not outputs:
            return torch.zeros(()), {}
        visual = torch.cat(outputs)
        total, stats = torch.zeros(()), {}
        if self.norm_weight > 0:
            text = self.model[0].model.language_model.embed_tokens.weight.norm(dim=-1).mean().detach()
            ratio = visual.norm(dim=-1).mean() / text
            total = total + self.norm_weight * torch.log(ratio) ** 2
            stats["visual_norm_ratio"] = round(float(ratio.detach()), 3)
        if self.probe_weight > 0 and labels is not None:
            if labels.shape[0] != visual.shape[0]:
                raise ValueError(f"grounding_labels has {labels.shape[0]} rows, the vision tower gave "
                                 f"{visual.shape[0]} tokens")
            logits = self.head(visual)
            # cells are mostly empty: positives weigh PROBE_POS_WEIGHT times more
            probe = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, labels, pos_weight=torch.full((labels.shape[1],), PROBE_POS_WEIGHT))
            total = total + self.probe_weight * probe
            stats["probe_loss"] = round(float(probe.detach()), 4)
            stats.update(probe_f1(logits.detach(), labels))
            stats.update(probe_accuracy(logits.detach(), labels))
        return total, stats


def probe_f1(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """F1 of the probe's thresholded predictions per class group (how readable the tower is)."""
    out = {}
    pred = logits > 0
    for group, names in PROBE_GROUPS.items():
        cols = [PROBE_CLASSES.index(n) for n in names]
        p, y = pred[:, cols], labels[:, cols] > 0.5
        tp = float((p & y).sum())
        denom = float(p.sum() + y.sum())
        out[f"f1_{group}"] = round(2 * tp / denom, 3) if denom else 1.0
    return out


def probe_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Per group, the argmax accuracy of the probe over the cells that hold exactly one class of the
    group (one object): what a reader of the token could name (chance: 1 / classes)."""
    out = {}
    for group in ("color", "shape", "direction", "speed"):
        cols = [PROBE_CLASSES.index(n) for n in PROBE_GROUPS[group]]
        y = labels[:, cols]
        one = y.sum(1) == 1
        if bool(one.any()):
            hits = logits[one][:, cols].argmax(1) == y[one].argmax(1)
            out[f"acc_{group}"] = round(float(hits.float().mean()), 3)
    return out


@torch.no_grad()
def video_dependence(model, batch: dict) -> float:
    """How much the answers depend on the video: the answer loss with every row's video replaced by
    the next row's, minus the true loss (0: the model ignores the video). Needs >= 2 rows of one
    frame size and count (make_batch gives that)."""
    rows = len(batch["video_grid_thw"])
    swapped = dict(batch)
    swapped["pixel_values_videos"] = batch["pixel_values_videos"].view(rows, -1, batch["pixel_values_videos"].shape[-1]) \
        .roll(1, 0).flatten(0, 1)
    return float(answer_loss(model, swapped) - answer_loss(model, batch))


# ----------------------------------------------------------------------------- eval

@torch.no_grad()
def generate_answer(model, tokenizer, world: World, question: str, visual_tokens: int, size: int = 112,
                    max_new_tokens: int = 480) -> str:
    """Greedy answer of the stock model to one question about `world` at ~`visual_tokens` tokens."""
    num_frames = frames_for_tokens(visual_tokens, size)
    video = video_inputs(world, num_frames, size)
    tokens = int(video["video_grid_thw"].prod()) // 4
    ids, _ = chat_ids(tokenizer, [(question, None)], tokens)
    input_ids = torch.tensor([ids])
    video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         mm_token_type_ids=(input_ids == video_id).long() * 2, **video,
                         max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def narration_accuracy(model, tokenizer, visual_tokens: int, num_videos: int, first_index: int,
                       max_new_tokens: int = 480, size: int = 112) -> tuple[float, dict]:
    """Fraction of narration facts stated correctly on held-out videos, and the per-kind sums."""
    was_training = model.training
    model.eval()
    per_kind: dict[str, list[int]] = {}
    for i in range(first_index, first_index + num_videos):
        world = World(heldout_world_seed(i))
        text = generate_answer(model, tokenizer, world, EVAL_PROMPT, visual_tokens, size, max_new_tokens)
        for kind, (found, total) in score_narration(world, text).items():
            acc = per_kind.setdefault(kind, [0, 0])
            acc[0] += found
            acc[1] += total
    model.train(was_training)
    return fact_fraction({k: tuple(v) for k, v in per_kind.items()}), per_kind


# ----------------------------------------------------------------------------- checkpoints

def save_model_dir(directory: Path, model, tokenizer_dir: Path, optimizer=None, step: int = 0,
                   extra: dict | None = None, also=None) -> None:
    """An HF model directory (config, generation config, safetensors, tokenizer + processor files),
    plus train_state.pt with the optimizer when given (loop.checkpoint_dir: written beside, swapped in)."""
    with checkpoint_dir(directory, optimizer, step, extra, also) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        copy_files(tokenizer_dir, tmp, PROCESSOR_FILES)      # only these: the tokenizer dir may be a model dir


def export_model_dir(src: Path, dst: Path) -> None:
    """Copy the inference files of an HF model directory (no optimizer state)."""
    copy_files(src, dst, HF_FILES)


def load_tokenizer_dir(args, out: Path) -> Path:
    if args.tokenizer:
        return Path(args.tokenizer)
    directory = out / "tokenizer"
    if not (directory / "tokenizer.json").is_file():
        from ..data.qwen_tokenizer import build_tokenizer_dir  # noqa: PLC0415

        print(f"training the BPE tokenizer ({args.vocab_size} ids) on {args.tokenizer_worlds} worlds", flush=True)
        build_tokenizer_dir(directory, num_worlds=args.tokenizer_worlds, vocab_size=args.vocab_size,
                            with_english=args.vocab_size > 1024)
    return directory


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration  # noqa: PLC0415
    from transformers import GenerationConfig  # noqa: PLC0415

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = load_tokenizer_dir(args, out)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    last = out / "last"
    if args.resume and (last / "model.safetensors").is_file():
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(last), dtype=torch.float32,
                                                                   attn_implementation="sdpa", local_files_only=True)
    elif args.init:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32,
                                                                   attn_implementation="sdpa", local_files_only=True)
        print(f"initialized from {args.init}", flush=True)
        if args.reinit_vision:
            reinit_vision(model, args.seed)
            print("vision tower and merger re-initialised", flush=True)
    else:
        config = build_config(args, tokenizer)
        config._attn_implementation = "sdpa"
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), do_sample=False, max_new_tokens=512)
    optimizer = torch.optim.AdamW(param_groups(model, args), lr=args.lr, betas=(0.9, 0.95))
    aux = VisualAuxLosses(model, args.visual_norm_weight, args.grounding_weight,
                          tokenizer if args.probe == "words" else None)
    if args.grounding_weight > 0:
        optimizer.add_param_group({"params": list(aux.head.parameters()), "weight_decay": 0.0,
                                   "lr_scale": args.vision_lr_scale})
    step = 0
    resuming = args.resume and (last / "model.safetensors").is_file()
    if args.resume:
        check_resume_options(last, args)
        step = resume_step(last, optimizer)
        if step:
            print(f"resumed from {last} at step {step}", flush=True)
        if aux.head is not None and (last / PROBE_FILE).is_file():
            from safetensors.torch import load_file  # noqa: PLC0415

            aux.head.load_state_dict(load_file(str(last / PROBE_FILE)))
    if not resuming and args.init and aux.head is not None:
        init_probe_head(aux.head, Path(args.init), args.probe)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Qwen2.5-VL: {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}; training to step {args.steps}",
          flush=True)
    job = (TowerJob if args.stage == "tower" else QwenJob)(model, tokenizer, tokenizer_dir, aux, args)
    run(job, args, out, optimizer, step)
    return 0


_WORKER_TOKENIZER = None


def _worker_init(tokenizer_dir: str) -> None:
    """A data worker: one thread, its own tokenizer."""
    global _WORKER_TOKENIZER
    from transformers import AutoTokenizer  # noqa: PLC0415

    torch.set_num_threads(1)
    _WORKER_TOKENIZER = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


def stage_batch(seed: int, step: int, args, tokenizer) -> dict:
    """The batch of `step` for the run's `--stage`."""
    if args.stage == "tower":
        return make_tower_batch(seed, step, args)
    return make_batch(seed, step, args, tokenizer)


def _worker_batch(seed: int, step: int, args) -> dict:
    return stage_batch(seed, step, args, _WORKER_TOKENIZER)


def init_probe_head(head, init: Path, probe: str) -> None:
    """Start the probe head from `init`'s (a tower stage's OUT/last) when it holds one of the same
    `--probe` kind (its meta.json says which); otherwise it starts fresh, and says so."""
    meta = init / "meta.json"
    kind = json.loads(meta.read_text()).get("probe") if meta.is_file() else None
    if not (init / PROBE_FILE).is_file() or kind is None:
        print(f"{init} holds no probe head (a tower stage's OUT/last has one); the --probe {probe} head starts "
              f"fresh", flush=True)
    elif kind != probe:
        print(f"{init} holds a --probe {kind} head; the --probe {probe} head starts fresh", flush=True)
    else:
        from safetensors.torch import load_file  # noqa: PLC0415

        head.load_state_dict(load_file(str(init / PROBE_FILE)))
        print(f"probe initialized from {init}", flush=True)


def check_resume_options(last: Path, args) -> None:
    """A resumed run must train the same parameter groups: refuse a probe switched on or off, or
    changed in kind, against what OUT/last recorded (checkpoints without the record pass)."""
    meta_path = last / "meta.json"
    if not meta_path.is_file():
        return
    meta = json.loads(meta_path.read_text())
    if meta.get("stage", "joint") != args.stage:
        raise ValueError(f"--resume: {last} was trained with --stage {meta.get('stage', 'joint')}, got --stage "
                         f"{args.stage}; start the next stage in a new --out with --init {last}")
    if "grounding_weight" in meta and (float(meta["grounding_weight"]) > 0) != (args.grounding_weight > 0):
        raise ValueError(f"--resume: {last} was trained with --grounding-weight {meta['grounding_weight']}; a "
                         f"resumed run must keep the probe on or off (got --grounding-weight {args.grounding_weight})")
    if args.grounding_weight > 0 and meta.get("probe", args.probe) != args.probe:
        raise ValueError(f"--resume: {last} was trained with --probe {meta['probe']}, got --probe {args.probe}")


class QwenJob(TrainJob):
    """The stock Qwen2.5-VL's batches, answer loss (+ the training-only visual losses), HF model
    directories and narration eval for `loop.run`."""

    desc = "train-target qwen2_5_vl"
    log_every = 20

    def __init__(self, model, tokenizer, tokenizer_dir: Path, aux: VisualAuxLosses, args):
        self.model, self.tokenizer, self.tokenizer_dir, self.aux, self.args = model, tokenizer, tokenizer_dir, aux, args
        self.pool, self.pending = None, {}

    def make_batch(self, step: int) -> dict:
        if self.args.data_workers <= 0:
            return stage_batch(self.args.seed, step, self.args, self.tokenizer)
        if self.pool is None:
            import concurrent.futures  # noqa: PLC0415
            import multiprocessing  # noqa: PLC0415

            self.pool = concurrent.futures.ProcessPoolExecutor(
                self.args.data_workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init, initargs=(str(self.tokenizer_dir),))
        for ahead in range(step, min(step + 1 + self.args.data_workers, self.args.steps)):   # the next batches
            if ahead not in self.pending:
                self.pending[ahead] = self.pool.submit(_worker_batch, self.args.seed, ahead, self.args)
        for old in [k for k in self.pending if k < step]:
            self.pending.pop(old).cancel()
        return self.pending.pop(step).result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool, self.pending = None, {}

    def losses(self, batch: dict):
        loss = answer_loss(self.model, batch)
        aux_loss, aux_stats = self.aux.take(batch["grounding_labels"])
        return loss, loss + aux_loss, aux_stats

    def tokens(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    def save(self, directory: Path, optimizer, step: int, extra: dict, also=None) -> None:
        if optimizer is not None:       # OUT/last: what a resume must match
            extra = {**extra, "grounding_weight": self.args.grounding_weight, "probe": self.args.probe,
                     "stage": self.args.stage}
        save_model_dir(directory, self.model, self.tokenizer_dir, optimizer, step, extra, also)

    def save_training_state(self, directory: Path) -> None:
        if self.args.grounding_weight > 0:
            from safetensors.torch import save_file  # noqa: PLC0415

            save_file({k: v.contiguous() for k, v in self.aux.head.state_dict().items()}, str(directory / PROBE_FILE))

    def evaluate(self) -> tuple[dict, float]:
        args = self.args
        dependence = video_dependence(self.model, make_batch(args.seed + 1, 10**6, args, self.tokenizer))
        budgets = [int(x) for x in str(args.eval_visual_tokens).split(",") if x]
        acc = {v: narration_accuracy(self.model, self.tokenizer, v, args.eval_videos, args.eval_first_video,
                                     args.eval_max_new_tokens, args.eval_frame_size)[0] for v in budgets}
        return ({"eval_narration_facts": {str(k): round(v, 4) for k, v in acc.items()},
                 "video_dependence": round(dependence, 4)}, float(np.mean(list(acc.values()))))

    def export(self, source: Path, destination: Path) -> None:
        export_model_dir(source, destination)


class TowerJob(QwenJob):
    """`--stage tower`: the vision tower and merger (the language model frozen) trained on the
    grounding probe alone, on videos without text; evaluated by the probe's accuracy per group on
    the validation worlds. Saves the whole HF model (its language model unchanged) and the probe,
    for a joint stage started with `--init OUT/last`. With `--ema` the probe head is averaged too,
    so an evaluation reads the averaged tower with the averaged head (the head's average restarts
    from the trained head on a resume)."""

    desc = "train-target qwen2_5_vl (tower)"

    def __init__(self, model, tokenizer, tokenizer_dir: Path, aux: VisualAuxLosses, args):
        super().__init__(model, tokenizer, tokenizer_dir, aux, args)
        self.head_average = WeightAverage(aux.head, args.ema) if args.ema > 0 else None

    def after_step(self, step: int) -> None:
        if self.head_average is not None:
            self.head_average.update(self.aux.head, step)

    def losses(self, batch: dict):
        self.model.model.visual(batch["pixel_values_videos"], grid_thw=batch["video_grid_thw"])   # hook records it
        loss, stats = self.aux.take(batch["grounding_labels"])
        return loss, loss, stats

    def tokens(self, batch: dict) -> int:
        return int(batch["grounding_labels"].shape[0])

    @torch.no_grad()
    def evaluate(self) -> tuple[dict, float]:
        """Probe F1 and accuracy on `--eval-videos` validation worlds at each `--eval-visual-tokens`
        budget, rendered at `--eval-frame-size`; the score is the mean accuracy."""
        if self.head_average is None:
            return self._evaluate()
        with self.head_average.swapped_in(self.aux.head):
            return self._evaluate()

    def _evaluate(self) -> tuple[dict, float]:
        args = self.args
        size = args.eval_frame_size
        fields, scores = {}, []
        for budget in [int(x) for x in str(args.eval_visual_tokens).split(",") if x]:
            frames = frames_for_tokens(budget, size)
            logits, labels = [], []
            for i in range(args.eval_first_video, args.eval_first_video + args.eval_videos):
                world = World(heldout_world_seed(i))
                video = video_inputs(world, frames, size)
                visual = self.model.model.visual(video["pixel_values_videos"], grid_thw=video["video_grid_thw"])
                logits.append(self.aux.head(visual.pooler_output))
                labels.append(grounding_labels(world, frames, size))
            logits, labels = torch.cat(logits), torch.cat(labels)
            acc = probe_accuracy(logits, labels)
            fields[f"probe_{budget}"] = {**probe_f1(logits, labels), **acc}
            scores.append(float(np.mean(list(acc.values()))) if acc else 0.0)   # no one-object cell: 0
        return fields, float(np.mean(scores)) if scores else 0.0


if __name__ == "__main__":
    raise SystemExit(main())
