"""`sparrow train-draft`: self-distillation training of a Sparrow draft (VATA, IVSB, MTP) and
of the baselines and ablations in the same code (visual-KV draft; each component on/off).
It trains only the draft head: the target is frozen, its embedding and LM head are never
saved with the draft. `main(argv)` is the CLI entry; `train(args)` is the library entry.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..speculative.draft import CONFIG_NAME, WEIGHTS_NAME, DraftConfig, SparrowDraft
from ..speculative.draft_inputs import kept_mask, kept_positions, shift_pairs
from .loop import lr_at
from .distill_data import (DistillGroup, HiddenStateStore, TargetSequences, cached_answered_groups, file_plan,
                           tiny_plan)

# name: (vata, ivsb, mtp) as in the paper's ablation; visual_kv is the EAGLE/MSD-style baseline
PRESETS = {
    "sparrow": (True, True, True),
    "visual_kv": (False, False, True),
    "none": (False, False, False),
    "vata": (True, False, False),
    "mtp": (False, False, True),
    "mtp_ivsb": (False, True, True),
}
TRAINER_STATE = "trainer_state.pt"


# --------------------------------------------------------------------------- batches


@dataclass
class DraftBatch:
    """A group laid out as the draft sees it in training.

    Entry e (slot e) pairs the target feature at target position `entry_pos[b, e]` with the
    token at `token_pos[b, e]` (the next position in the draft's order: the EAGLE shift).
    Entries < query_start are a prefix that is only attended to (IVSB visual states, or the
    leading visual positions of the visual-KV order). tokens `[B, S]`, features `[B, S, F]`,
    valid `[B]`, token_pos `[B, S]` (-1 = padding), label_ok `[B, S]`: the token after
    token_pos is an answer token the target predicted (the loss positions)."""

    tokens: Tensor
    features: Tensor
    valid: Tensor
    token_pos: Tensor
    label_ok: Tensor
    query_start: int
    n_anchor: int

    def to(self, device) -> "DraftBatch":
        return DraftBatch(self.tokens.to(device), self.features.to(device), self.valid.to(device),
                          self.token_pos.to(device), self.label_ok.to(device), self.query_start, self.n_anchor)


def draft_order(seqs: TargetSequences, include_visual: bool, visual_first: bool) -> list[Tensor]:
    """Target positions the draft sees, per row: text only (VATA) or every position in order
    (visual-KV), as inference keeps them (draft_inputs.kept_mask); or, for the IVSB prefix
    under VATA (training only), the visual states first, then the text."""
    if include_visual and visual_first:
        orders = []
        for b in range(seqs.ids.shape[0]):
            n = int(seqs.lengths[b])
            text = seqs.text_mask[b, :n]
            positions = torch.arange(n)
            orders.append(torch.cat([positions[~text], positions[text]]))
        return orders
    order, count = kept_positions(kept_mask(seqs.text_mask, seqs.lengths, visual_kv=include_visual))
    return [order[b, :int(count[b])] for b in range(order.shape[0])]


def make_draft_batch(seqs: TargetSequences, config: DraftConfig, include_visual: bool, visual_first: bool,
                     visual_layer: int | None) -> DraftBatch:
    orders = draft_order(seqs, include_visual, visual_first)
    B = len(orders)
    S = max(len(o) for o in orders) - 1                                              # entries per row
    order_index = torch.full((B, S + 1), -1, dtype=torch.long)                       # [B, S+1]
    for b, o in enumerate(orders):
        order_index[b, :len(o)] = o
    # the EAGLE shift as inference lays it out; the last kept position's token lies past the
    # sequence (no label), so a row has one entry fewer than kept positions
    entry_pos, token_pos = shift_pairs(order_index, torch.tensor([len(o) for o in orders], dtype=torch.long))
    valid = torch.tensor([len(o) - 1 for o in orders], dtype=torch.long)             # [B]
    is_entry = torch.arange(S)[None, :] < valid[:, None]                             # [B, S]
    entry_pos = torch.where(is_entry, entry_pos[:, :S], -1)                          # [B, S]
    token_pos = token_pos[:, :S]                                                     # [B, S], -1 past valid
    tokens = seqs.ids.gather(1, token_pos.clamp(min=0)) * is_entry                   # [B, S]
    layers = [seqs.hidden[layer] for layer in config.feature_layers]
    features = ops.gather_hidden(layers, entry_pos)                                  # [B, S, F]
    if include_visual and visual_layer is not None:
        visual_states = ops.gather_hidden([seqs.hidden[visual_layer]] * len(layers), entry_pos)
        entry_is_text = seqs.text_mask.gather(1, entry_pos.clamp(min=0))             # [B, S]
        features = torch.where(entry_is_text[..., None], features, visual_states)
    # leading entries that are never queried: the visual prefix shared by every row
    query_start = 0
    if include_visual:
        leading = []
        for b, o in enumerate(orders):
            text_at = seqs.text_mask[b, o[:-1]].nonzero()
            leading.append(int(text_at[0, 0]) if len(text_at) else int(valid[b]))
        query_start = min(leading)
    n_anchor = config.n_anchor
    if include_visual and visual_first and config.window > 0:
        n_anchor += query_start                                      # the prefix stays visible, like the prompt
    # loss where the token after token_pos is an answer token: answer_start - 1 <= pos <= length - 2
    label_ok = is_entry & (token_pos >= seqs.answer_start[:, None] - 1) & (token_pos <= seqs.lengths[:, None] - 2)
    return DraftBatch(tokens, features, valid, token_pos, label_ok, query_start, n_anchor)


def unrolled_loss(draft: SparrowDraft, batch: DraftBatch, seqs: TargetSequences, steps: int, decay: float,
                  feature_weight: float, last_layer: int) -> tuple[Tensor, dict]:
    """Training-time test loss: soft cross-entropy against the target's distribution at each
    unrolled step (weights decay**(k-1)), plus optional smooth-L1 feature regression.
    Returns (loss, stats) with per-step top-1 agreement counts."""
    dev = draft.device
    batch = batch.to(dev)
    hidden_last = seqs.hidden[last_layer].to(dev)                                    # [B, T, H]
    outs = draft.unrolled_forward(batch.tokens, batch.features, batch.valid, steps, batch.query_start,
                                  batch.n_anchor)
    B, S = batch.tokens.shape
    Tq = S - batch.query_start
    chain = batch.query_start + torch.arange(Tq, device=dev)                         # [Tq] entry of each chain
    total, weight_sum = torch.zeros((), device=dev), 0.0
    stats = {"agree": [], "count": [], "ce": []}
    regress = feature_weight > 0 and draft.config.feature_layers == (last_layer,)
    for k, out in enumerate(outs, start=1):
        entry = (chain + k - 1).clamp(max=S - 1)                                     # [Tq] entry whose token step k reads
        ok = batch.label_ok[:, entry] & (chain + k - 1 < S)[None, :]                 # [B, Tq]
        ok &= (chain[None, :] + k - 1) < batch.valid[:, None]
        pos = batch.token_pos[:, entry]                                              # [B, Tq] target position of the label
        rows, cols = ok.nonzero(as_tuple=True)
        n = int(rows.numel())
        if n == 0:
            stats["agree"].append(0)
            stats["count"].append(0)
            stats["ce"].append(0.0)
            continue
        target_h = hidden_last[rows, pos[rows, cols]]                                # [N, H]
        with torch.no_grad():
            target_logits = draft.head_logits(target_h).float()                      # [N, V]
        target_top = target_logits.argmax(-1)                                        # [N] the target's token
        draft_h = out[rows, cols]                                                    # [N, H]
        draft_logits = draft.logits(draft_h).float()                                 # [N, V]
        vocab = draft.draft_vocab
        if vocab is not None:      # EAGLE-3: both distributions over the draft vocabulary's K ids
            target_logits, draft_logits = target_logits[:, vocab], draft_logits[:, vocab]   # [N, K]
        target_logp = torch.log_softmax(target_logits, dim=-1)
        draft_logp = torch.log_softmax(draft_logits, dim=-1)
        draft_top = draft_logp.argmax(-1) if vocab is None else vocab[draft_logp.argmax(-1)]
        ce = -(target_logp.exp() * draft_logp).sum(-1).mean()
        loss_k = ce
        if regress:
            loss_k = loss_k + feature_weight * F.smooth_l1_loss(draft_h.float(), target_h.float())
        w = decay ** (k - 1)
        total = total + w * loss_k
        weight_sum += w
        agree = int((draft_top == target_top).sum())
        stats["agree"].append(agree)
        stats["count"].append(n)
        stats["ce"].append(float(ce.detach()))
    return total / max(weight_sum, 1e-12), stats


# --------------------------------------------------------------------------- setup


def draft_vocab_from_answers(groups: list[DistillGroup], size: int, vocab_size: int,
                              always: Sequence[int] = ()) -> Tensor:
    """The draft vocabulary (EAGLE-3's draft-to-target map) of `size` target ids: `always`
    (e.g. the target's EOS ids) first, then the ids the target's answers in `groups` use most,
    then, for ids they never use, the lowest ids (for a BPE vocabulary: the earliest merges, the
    commonest pieces of the tokenizer's corpus). Sorted int64 `[size]`."""
    if not 1 <= size <= vocab_size:
        raise ValueError(f"--draft-vocab must be in [1, vocab_size={vocab_size}], got {size}")
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for group in groups:
        for sample in group.samples:
            ids = torch.tensor(sample.answer_ids, dtype=torch.int64)
            counts += torch.bincount(ids[(ids >= 0) & (ids < vocab_size)], minlength=vocab_size)
    order = sorted(range(vocab_size), key=lambda i: (-int(counts[i]), i))     # by count, ties by id
    chosen = list(dict.fromkeys([int(i) for i in always if 0 <= int(i) < vocab_size] + order))[:size]
    return torch.tensor(sorted(chosen), dtype=torch.int64)


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 5)


def vocab_coverage(groups: list[DistillGroup], vocab: Tensor) -> float | None:
    """Fraction of the answer tokens in `groups` that lie in `vocab` (None without tokens)."""
    inside = total = 0
    allowed = set(vocab.tolist())
    for group in groups:
        for sample in group.samples:
            inside += sum(1 for t in sample.answer_ids if t in allowed)
            total += len(sample.answer_ids)
    return inside / total if total else None


def load_any_target(spec: str | None, device: str = "cpu"):
    """'tiny'/None: the committed tiny VLM; a directory with a tiny VLM config: that checkpoint;
    anything else: `sparrow_kernels.targets.load_target`."""
    from ..targets.tinyvlm import TinyVLMTarget

    if spec in (None, "tiny"):
        return TinyVLMTarget.load(device=device)
    config = Path(spec) / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "sparrow_tinyvlm":
        return TinyVLMTarget.load(spec, device=device)
    from ..targets import load_target

    return load_target(spec, device=device)


def target_fingerprint(spec: str | None, target) -> str:
    """Identifies the target's weights (so cached answers are never reused across targets)."""
    from ..targets import resolve_target
    from ..targets.tinyvlm import DEFAULT_CHECKPOINT

    spec = resolve_target(spec)
    path = Path(DEFAULT_CHECKPOINT if spec == "tiny" else spec) / "model.safetensors"
    if path.is_file():
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()[:16]
    return f"{spec}:{target.num_layers}x{target.hidden_size}"


def parse_layers(text: str, num_layers: int) -> tuple[int, ...]:
    """'last' / '4' / '1,2,4' / 'eagle3' (low, mid, high) -> target layer numbers."""
    text = text.strip().lower()
    if text == "last":
        return (num_layers,)
    if text == "eagle3":
        return tuple(dict.fromkeys((min(2, num_layers), max(1, num_layers // 2), max(1, num_layers - 1))))
    return tuple(int(x) for x in text.split(","))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparrow train-draft", description=" ".join(__doc__.split()).split(". ")[0] + ".",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--target", default="tiny", help="'tiny' (committed tiny VLM), 'qwen2_5_vl_world' (the committed Qwen2.5-VL) or a target directory")
    p.add_argument("--out", required=True, help="output directory (draft, trainer state, logs)")
    p.add_argument("--export", default=None, help="also copy the final draft (model + config) here")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="set --vata/--ivsb/--mtp as in the paper's ablation (explicit flags still win)")
    p.add_argument("--vata", action=argparse.BooleanOptionalAction, default=None,
                   help="text-only draft cache (off: visual positions in the draft's sequence, full attention)")
    p.add_argument("--ivsb", action=argparse.BooleanOptionalAction, default=None,
                   help="train with the target's mid-layer visual states prefixed to the text")
    p.add_argument("--mtp", action=argparse.BooleanOptionalAction, default=None,
                   help="unroll the draft --mtp-steps steps in training (off: 1 step)")
    p.add_argument("--mtp-steps", type=int, default=6,
                   help="unrolled steps with --mtp (6 covers the depth of the CPU draft trees)")
    p.add_argument("--loss-decay", type=float, default=0.8, help="weight of unrolled step k is decay**(k-1)")
    p.add_argument("--feature-weight", type=float, default=0.0,
                   help="smooth-L1 feature regression weight (0: cross-entropy only, as EAGLE-3)")
    p.add_argument("--ivsb-keep", type=float, default=0.25,
                   help="IVSB under VATA: fraction of training steps that carry the visual prefix (the rest "
                        "are text only, as at inference); 1.0 = always (the paper's recipe), which measured "
                        "worse on the tiny VLM")
    p.add_argument("--ivsb-layer", type=int, default=None, help="m*: target layer of the visual states (default L/2)")
    p.add_argument("--feature-layers", default="last", help="'last', 'eagle3' or a comma list of target layers")
    p.add_argument("--window", type=int, default=48, help="VATA window (keys incl. the query); 0 unlimited")
    p.add_argument("--n-anchor", type=int, default=16, help="first draft-cache slots always visible")
    p.add_argument("--num-heads", type=int, default=None)
    p.add_argument("--num-kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--intermediate-size", type=int, default=None)
    p.add_argument("--draft-vocab", type=int, default=None, metavar="K",
                   help="draft vocabulary (EAGLE-3): propose only the K target ids the target's answers use most; "
                        "0: the whole vocabulary; unset: the whole vocabulary, or a resumed draft's own. With "
                        "--resume on a finished run it is added to (or, with 0, removed from) the trained draft")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="videos per step (one frame count per step)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-groups", type=int, default=150, help="distinct training batches (groups of videos)")
    p.add_argument("--frames-min", type=int, default=4)
    p.add_argument("--frames-max", type=int, default=64)
    p.add_argument("--caption-fraction", type=float, default=0.8, help="caption prompts vs QA prompts")
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--data", default=None, help="HF targets: JSON list of {video, prompt, num_frames}")
    p.add_argument("--eval-data", default=None,
                   help="HF targets: held-out JSON list of {video, prompt, num_frames}, evaluated per frame count")
    p.add_argument("--data-cache", default=None, help="directory for the distilled answers (default --out)")
    p.add_argument("--cache-dir", default=None, help="cache target hidden states here (default: online)")
    p.add_argument("--cache-budget-mb", type=float, default=2048.0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-frames", default="16,128,256", help="held-out frame counts for the final evaluation")
    p.add_argument("--eval-groups", type=int, default=3, help="held-out batches per frame count")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--resume", action="store_true", help="continue from --out's trainer state")
    p.add_argument("--init", default=None, metavar="DRAFT_DIR",
                   help="start from this trained draft's weights (e.g. after the target was trained further: "
                        "re-distill on its new answers without starting over); its config must be the one "
                        "these flags build; fresh optimizer and schedule; its vocabulary is kept unless "
                        "--draft-vocab K chooses one from this run's answers")
    p.add_argument("--prepare-only", action="store_true",
                   help="only distill the answers and fill --cache-dir with the target states, then exit")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (saving the trainer state) once this many steps are done, as if interrupted")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


def resolve_flags(args: argparse.Namespace) -> tuple[bool, bool, bool]:
    vata, ivsb, mtp = PRESETS[args.preset] if args.preset else (True, True, True)
    return (vata if args.vata is None else args.vata, ivsb if args.ivsb is None else args.ivsb,
            mtp if args.mtp is None else args.mtp)


def make_draft_config(target, args, vata: bool, ivsb: bool) -> DraftConfig:
    heads = args.num_heads or max(1, target.hidden_size // 64)
    kv_heads = args.num_kv_heads or max(1, heads // 2)
    ivsb_layer = args.ivsb_layer if args.ivsb_layer is not None else target.num_layers // 2
    return DraftConfig(
        hidden_size=target.hidden_size, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=args.head_dim or target.hidden_size // heads,
        intermediate_size=args.intermediate_size or int(target.hidden_size * 2.75),
        vocab_size=target.vocab_size, feature_layers=parse_layers(args.feature_layers, target.num_layers),
        window=args.window if vata else 0, n_anchor=args.n_anchor if vata else 0, visual_kv=not vata,
        visual_feature_layer=ivsb_layer if (ivsb and not vata) else None)


def group_schedule(n_groups: int, steps: int, seed: int) -> list[int]:
    """Which training group each step uses: a fresh permutation per epoch (seeded)."""
    order: list[int] = []
    epoch = 0
    while len(order) < steps:
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        order += torch.randperm(n_groups, generator=g).tolist()
        epoch += 1
    return order[:steps]


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(draft: SparrowDraft, store: HiddenStateStore, groups: list[DistillGroup], layout: dict, steps: int,
             last_layer: int) -> dict:
    """Top-1 agreement of the draft with the target per unrolled step (teacher-forced tokens,
    self-fed hidden states), on held-out groups."""
    agree = [0] * steps
    count = [0] * steps
    for i, group in enumerate(groups):
        seqs = store.get(i, group)
        batch = make_draft_batch(seqs, draft.config, **layout)
        _, stats = unrolled_loss(draft, batch, seqs, steps, 1.0, 0.0, last_layer)
        for k in range(steps):
            agree[k] += stats["agree"][k]
            count[k] += stats["count"][k]
    top1 = [a / c if c else float("nan") for a, c in zip(agree, count)]
    # expected accepted draft tokens of a chain if step k is accepted with prob top1[k]
    chain_tau, alive = 1.0, 1.0
    for t in top1:
        if not math.isnan(t):
            alive *= t
            chain_tau += alive
    return {"top1_per_step": [round(t, 4) for t in top1], "positions": count[0], "chain_tau_estimate": round(chain_tau, 3)}


# --------------------------------------------------------------------------- training


def load_init(init_dir: str, config: DraftConfig, target) -> SparrowDraft:
    """The trained draft in `init_dir` (for `--init`), checked before any work: its config must
    agree with `config` (the one the flags build) in everything but the vocabulary size, so a warm
    start never silently changes the recipe or the architecture."""
    try:
        start = SparrowDraft.load(init_dir, target).float()
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"--init {init_dir}: {err}") from err
    mine, theirs = config.to_dict(), start.config.to_dict()
    differ = sorted(k for k in set(mine) | set(theirs) if k != "draft_vocab_size" and mine.get(k) != theirs.get(k))
    if differ:
        detail = ", ".join(f"{k}: flags {mine.get(k)!r}, draft {theirs.get(k)!r}" for k in differ)
        raise ValueError(f"--init {init_dir}: its config differs from the one these flags build ({detail}); "
                         f"pass the flags (or --preset) it was trained with")
    return start


def adopt_weights(draft: SparrowDraft, source: SparrowDraft) -> None:
    """Make `draft` hold `source`'s weights and draft vocabulary (a resume or a warm start)."""
    draft.set_draft_vocab(source.draft_vocab)
    draft.load_state_dict(source.state_dict())


def warm_start(draft: SparrowDraft, start: SparrowDraft, init_dir: str) -> dict:
    """Copy the weights and draft vocabulary of `start` (load_init) into `draft`. Returns what the
    new draft records about its start: the directory, the target fingerprint and the (planned)
    steps of the run that trained it, and that run's own start if it had one."""
    adopt_weights(draft, start)
    info = start.training_info
    return {"from": str(Path(init_dir)), "target": info.get("target"), "steps": info.get("steps"),
            "preset": info.get("preset"), **({"init": info["init"]} if "init" in info else {})}


def train(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    vata, ivsb, mtp = resolve_flags(args)
    if args.eval_data and not args.data:
        raise ValueError("--eval-data is the held-out set of --data (HF targets); pass --data too")
    steps_unrolled = args.mtp_steps if mtp else 1
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = load_any_target(args.target, args.device)
    for p in getattr(target, "model", torch.nn.Module()).parameters():
        p.requires_grad_(False)                                      # frozen: no gradients into the target
    config = make_draft_config(target, args, vata, ivsb)
    resuming = args.resume and (out / TRAINER_STATE).is_file()
    init_draft = load_init(args.init, config, target) if args.init is not None and not resuming else None
    if config.window > 0 and config.window < steps_unrolled:
        raise ValueError(f"--window={config.window} must be 0 or >= the unrolled steps ({steps_unrolled})")
    last_layer = target.num_layers
    ivsb_layer = args.ivsb_layer if args.ivsb_layer is not None else target.num_layers // 2
    # training layout (IVSB may prefix visual states) vs inference layout (what the engine feeds)
    layout = {"include_visual": ivsb or not vata, "visual_first": vata,
              "visual_layer": ivsb_layer if ivsb else None}
    infer_layout = {"include_visual": not vata, "visual_first": False,
                    "visual_layer": ivsb_layer if (ivsb and not vata) else None}

    # ---- data: the target's greedy answers (cached as JSON), target states online or on disk
    fingerprint = target_fingerprint(args.target, target)
    data_dir = Path(args.data_cache or out)
    data_dir.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    if args.data:
        # time_scale: answers made with each clip's own frame rate (older caches used a fixed 2 fps)
        plan_meta = {"target": fingerprint, "data": str(Path(args.data).resolve()), "batch": args.batch_size,
                     "max_new_tokens": args.max_new_tokens, "time_scale": "prompt_fps"}
        def make_train():
            return file_plan(target, args.data, args.batch_size)
        eval_sets = sorted({g.num_frames for g in file_plan(target, args.eval_data, args.batch_size)}) \
            if args.eval_data else []
    else:
        plan_meta = {"target": fingerprint, "groups": args.train_groups, "batch": args.batch_size,
                     "frames": [args.frames_min, args.frames_max], "captions": args.caption_fraction,
                     "seed": args.seed, "max_new_tokens": args.max_new_tokens}
        def make_train():
            return tiny_plan(target, args.train_groups, args.batch_size, args.frames_min, args.frames_max,
                             args.seed, args.caption_fraction)
        eval_sets = [int(f) for f in str(args.eval_frames).split(",") if f.strip()]
    key = hashlib.sha1(json.dumps(plan_meta, sort_keys=True).encode()).hexdigest()[:12]
    train_groups = cached_answered_groups(target, data_dir / f"distill_{key}.json", plan_meta, make_train,
                                          args.max_new_tokens, progress, "distill train answers")
    eval_groups: dict[int, list[DistillGroup]] = {}
    eval_keys: dict[int, str] = {}
    for frames in eval_sets:
        meta = {"target": fingerprint, "heldout_frames": frames, "groups": args.eval_groups,
                "batch": args.batch_size, "max_new_tokens": args.max_new_tokens}
        if args.data:
            meta.update(data=str(Path(args.eval_data).resolve()), time_scale="prompt_fps")
            plan = lambda f=frames: [g for g in file_plan(target, args.eval_data, args.batch_size)   # noqa: E731
                                     if g.num_frames == f][:args.eval_groups]
        else:
            plan = lambda f=frames: tiny_plan(target, args.eval_groups, args.batch_size, f, f, 7,  # noqa: E731
                                              caption_fraction=1.0, heldout=True, frames=f)
        ekey = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
        eval_keys[frames] = ekey
        eval_groups[frames] = cached_answered_groups(
            target, data_dir / f"distill_eval_{ekey}.json", meta, plan,
            args.max_new_tokens, progress, f"distill eval answers ({frames} frames)")
    layers = sorted({*config.feature_layers, last_layer, ivsb_layer})
    store = HiddenStateStore(target, layers, args.cache_dir, args.cache_budget_mb, key)
    eval_stores = {frames: HiddenStateStore(target, layers, args.cache_dir, args.cache_budget_mb, f"eval_{ekey}")
                   for frames, ekey in eval_keys.items()}

    if args.prepare_only:
        from tqdm.auto import tqdm

        for i, group in enumerate(tqdm(train_groups, desc="target states", disable=not progress)):
            store.get(i, group)
        for frames, groups in eval_groups.items():
            for i, group in enumerate(groups):
                eval_stores[frames].get(i, group)
        return {"losses": [], "eval": {}, "draft": None}

    # ---- model, optimizer, resume
    draft = SparrowDraft.from_target(config, target).float()
    opt = torch.optim.AdamW(draft.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    start_step = 0
    previous_info: dict = {}
    init_info: dict | None = None
    log_path = out / "log.jsonl"
    if init_draft is not None:
        init_info = warm_start(draft, init_draft, args.init)
    if resuming:
        state = torch.load(out / TRAINER_STATE, weights_only=True)
        resumed = SparrowDraft.load(out, target).float()
        previous_info = resumed.training_info
        adopt_weights(draft, resumed)
        opt.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        torch.set_rng_state(state["rng"])
        started_from = previous_info.get("init", {}).get("from")
        if args.init is not None and started_from != str(Path(args.init)):
            raise ValueError(f"--init {args.init} with --resume: the run in {out} started from "
                             f"{started_from or 'scratch'}; resume without --init, or use a new --out")
    elif log_path.exists():
        log_path.unlink()
    if args.draft_vocab == 0:
        draft.set_draft_vocab(None)
    elif args.draft_vocab is not None and (draft.config.draft_vocab_size != args.draft_vocab
                                           or init_info is not None):    # a warm start picks from its new answers
        draft.set_draft_vocab(draft_vocab_from_answers(train_groups, args.draft_vocab, target.vocab_size,
                                                       always=target.eos_token_ids))
    draft.training_info = {
        "preset": args.preset, "vata": vata, "ivsb": ivsb, "mtp": mtp, "mtp_steps": steps_unrolled,
        "ivsb_layer": ivsb_layer if ivsb else None, "ivsb_keep": args.ivsb_keep if ivsb else None,
        "target": fingerprint, "seed": args.seed,
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "frames": [args.frames_min, args.frames_max], "train_videos": len(train_groups) * args.batch_size,
    }
    if init_info is not None or "init" in previous_info:
        draft.training_info["init"] = init_info if init_info is not None else previous_info["init"]
    schedule = group_schedule(len(train_groups), args.steps, args.seed)
    first_eval = min(eval_groups) if eval_groups else None

    def log(record: dict) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save() -> None:
        draft.save(out)
        torch.save({"optimizer": opt.state_dict(), "step": step + 1, "rng": torch.get_rng_state()},
                   out / f"{TRAINER_STATE}.tmp")
        os.replace(out / f"{TRAINER_STATE}.tmp", out / TRAINER_STATE)

    from tqdm.auto import tqdm

    bar = tqdm(range(start_step, args.steps), desc=f"train-draft {args.preset or ''}".strip(),
               initial=start_step, total=args.steps, disable=not progress)
    t0 = time.time()
    losses: list[float] = []
    step = start_step - 1
    for step in bar:
        draft.train()
        gi = schedule[step]
        seqs = store.get(gi, train_groups[gi])
        step_layout = layout
        if ivsb and vata and args.ivsb_keep < 1.0:
            coin = torch.rand((), generator=torch.Generator().manual_seed(args.seed * 1_000_003 + step))
            if float(coin) >= args.ivsb_keep:
                step_layout = infer_layout                           # this step: text only
        batch = make_draft_batch(seqs, config, **step_layout)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss, stats = unrolled_loss(draft, batch, seqs, steps_unrolled, args.loss_decay, args.feature_weight,
                                    last_layer)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(draft.parameters(), args.grad_clip)
        opt.step()
        loss_value = float(loss.detach())
        losses.append(loss_value)
        top1 = [a / c if c else float("nan") for a, c in zip(stats["agree"], stats["count"])]
        bar.set_postfix(loss=f"{loss_value:.3f}", top1="/".join(f"{t:.2f}" for t in top1))
        log({"step": step + 1, "loss": loss_value, "ce": stats["ce"], "top1": top1, "lr": lr_at(step, args),
             "grad_norm": float(grad_norm), "frames": train_groups[gi].num_frames, "time": time.time() - t0})
        if first_eval is not None and args.eval_every > 0 and (step + 1) % args.eval_every == 0 \
                and step + 1 < args.steps:
            draft.eval()
            result = evaluate(draft, eval_stores[first_eval], eval_groups[first_eval][:1], infer_layout,
                              steps_unrolled, last_layer)
            log({"step": step + 1, "eval_frames": first_eval, **result})
            bar.write(f"step {step + 1}: held-out top-1 per step ({first_eval} frames) {result['top1_per_step']}")
        if args.save_every > 0 and (step + 1) % args.save_every == 0:
            save()
        if args.stop_after is not None and step + 1 >= args.stop_after:
            save()
            bar.close()
            return {"losses": losses, "eval": {}, "draft": draft}
    if step >= start_step:
        save()

    # ---- final held-out evaluation at every requested length
    draft.eval()
    final = {}
    for frames, groups in eval_groups.items():
        final[str(target.visual_tokens_for(frames) if hasattr(target, "visual_tokens_for") else frames)] = \
            evaluate(draft, eval_stores[frames], groups, infer_layout, max(steps_unrolled, 4),
                     last_layer)
    draft.training_info["heldout_eval"] = final
    if draft.draft_vocab is not None:
        draft.training_info["draft_vocab"] = {
            "size": draft.config.draft_vocab_size,
            "train_answer_coverage": _rounded(vocab_coverage(train_groups, draft.draft_vocab)),
            "heldout_answer_coverage": _rounded(vocab_coverage([g for gs in eval_groups.values() for g in gs],
                                                               draft.draft_vocab))}
    draft.training_info["final_loss"] = round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4) if losses else \
        previous_info.get("final_loss")
    draft.save(out)
    log({"final_eval": final})
    (out / "eval.json").write_text(json.dumps(final, indent=2))
    if args.export:
        os.makedirs(args.export, exist_ok=True)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            shutil.copyfile(out / name, Path(args.export) / name)
    return {"losses": losses, "eval": final, "draft": draft}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = train(args)
    for tokens, ev in result["eval"].items():
        print(f"held-out, {tokens} frames: top-1 agreement per unrolled step {ev['top1_per_step']} "
              f"(chain tau estimate {ev['chain_tau_estimate']})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
