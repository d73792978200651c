"""Self-distillation data for draft training: the target's own greedy answers to training
prompts (synthetic worlds for the tiny VLM, a local video+prompt list for HF targets), and
the target's hidden states over [prompt, answer], computed online or read from a disk
cache with a size budget. It never trains anything and never touches draft weights.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..targets.base import VideoPrompt
from ..targets.decoding import kv_capacity

# --------------------------------------------------------------------------- the plan (what to ask)


@dataclass
class DistillSample:
    """One training example: a video (a synthetic world seed, or a file) at `num_frames`
    frames, the prompt's text ids, and the target's greedy answer ids (EOS included if
    the target produced it)."""

    num_frames: int
    prompt_ids: list[int]
    answer_ids: list[int]
    seed: int | None = None          # synthetic world (tiny VLM)
    video: str | None = None         # video file (HF targets)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class DistillGroup:
    """Samples batched together: all have the same number of frames (same visual count)."""

    num_frames: int
    samples: list[DistillSample]


def log_uniform_frames(rng: random.Random, frames_min: int, frames_max: int) -> int:
    """A frame count drawn log-uniformly in [frames_min, frames_max] (covers short and long videos)."""
    return int(round(math.exp(rng.uniform(math.log(frames_min), math.log(frames_max)))))


def tiny_prompt_ids(target, question: str | None) -> list[int]:
    """Token ids of the tiny VLM's prompt for `question` (None: the detailed caption)."""
    from ..data.synthetic import CAPTION_QUESTION, question_text

    if target.tokenizer is None:
        raise ValueError("the tiny VLM target has no tokenizer: cannot build training prompts")
    return target.tokenizer.encode(question_text(question or CAPTION_QUESTION), add_bos=True)


def _frames_of(sample: DistillSample) -> tuple[Tensor, float | None]:
    """The sample's frames and the rate they were sampled at (None for the tiny VLM's worlds)."""
    if sample.seed is not None:
        from ..data.synthetic import VideoWorld

        return VideoWorld(sample.seed).render(sample.num_frames), None               # [T, 32, 32, 3] uint8
    from ..data.video_io import probe_video, sampled_fps

    frames = read_video_frames(sample.video, sample.num_frames)
    return frames, sampled_fps(probe_video(sample.video), frames.shape[0])


def read_video_frames(path: str, num_frames: int) -> Tensor:
    """Frames `[T, H, W, 3]` uint8 of a video file, through the project's video reader (PyAV)."""
    from ..data.video_io import read_video

    return read_video(path, num_frames=num_frames)


def prompts_of(group: DistillGroup, with_answer: bool = False) -> list[VideoPrompt]:
    prompts = []
    for s in group.samples:
        frames, fps = _frames_of(s)
        prompts.append(VideoPrompt(frames=frames, fps=fps, prompt_ids=torch.tensor(
            s.prompt_ids + (s.answer_ids if with_answer else []), dtype=torch.long)))
    return prompts


def answer_groups(target, groups: list[DistillGroup], max_new_tokens: int, progress: bool = True,
                  desc: str = "distill answers") -> list[DistillGroup]:
    """Fill every sample's `answer_ids` with the target's greedy answer (self-distillation)."""
    from tqdm.auto import tqdm

    for group in tqdm(groups, desc=desc, disable=not progress, leave=False):
        answers = target.generate_greedy(prompts_of(group), max_new_tokens)
        for sample, answer in zip(group.samples, answers):
            sample.answer_ids = [int(t) for t in answer]
    return groups


def tiny_plan(target, num_groups: int, group_size: int, frames_min: int, frames_max: int, seed: int,
              caption_fraction: float = 0.8, heldout: bool = False,
              frames: int | None = None) -> list[DistillGroup]:
    """Training (or held-out) questions over synthetic worlds: each group draws one frame
    count (log-uniform in [frames_min, frames_max], or `frames`), then `group_size` worlds,
    each with the detailed-caption question or (1 - caption_fraction) a random QA question."""
    from ..data.synthetic import VideoWorld, heldout_seed

    rng = random.Random(seed)
    groups = []
    for g in range(num_groups):
        n_frames = frames if frames is not None else log_uniform_frames(rng, frames_min, frames_max)
        samples = []
        for i in range(group_size):
            world_seed = heldout_seed(seed * 100_003 + g * group_size + i) if heldout else rng.randrange(10**9)
            question = None
            if rng.random() >= caption_fraction:
                question = rng.choice(VideoWorld(world_seed).qa_pairs())[0]
            samples.append(DistillSample(num_frames=n_frames, prompt_ids=tiny_prompt_ids(target, question),
                                         answer_ids=[], seed=world_seed))
        groups.append(DistillGroup(n_frames, samples))
    return groups


def file_plan(target, pairs_path: str, group_size: int) -> list[DistillGroup]:
    """Questions over local videos (HF targets): `pairs_path` is a JSON list of
    {"video": path, "prompt": text, "num_frames": int}. Prompts are tokenized with the
    target's tokenizer (`target.tokenizer` / `target.processor.tokenizer`)."""
    entries = json.loads(Path(pairs_path).read_text())
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{pairs_path}: expected a non-empty JSON list of {{video, prompt, num_frames}}")
    tokenizer = getattr(target, "tokenizer", None) or getattr(getattr(target, "processor", None), "tokenizer", None)
    if tokenizer is None:
        raise ValueError("file_plan: the target has no tokenizer to encode the prompts")
    by_frames: dict[int, list[DistillSample]] = {}
    for i, entry in enumerate(entries):
        for key in ("video", "prompt", "num_frames"):
            if key not in entry:
                raise ValueError(f"{pairs_path}: entry {i} lacks {key!r}")
        ids = tokenizer.encode(entry["prompt"], add_special_tokens=False) \
            if not hasattr(tokenizer, "word_to_id") else tokenizer.encode(entry["prompt"], add_bos=True)
        sample = DistillSample(num_frames=int(entry["num_frames"]), prompt_ids=list(ids), answer_ids=[],
                               video=str(entry["video"]))
        by_frames.setdefault(sample.num_frames, []).append(sample)
    groups = []
    for n_frames, samples in sorted(by_frames.items()):
        for start in range(0, len(samples), group_size):
            groups.append(DistillGroup(n_frames, samples[start:start + group_size]))
    return groups


def save_groups(groups: list[DistillGroup], path: str | os.PathLike, meta: dict) -> None:
    payload = {"meta": meta, "groups": [{"num_frames": g.num_frames, "samples": [s.to_dict() for s in g.samples]}
                                        for g in groups]}
    tmp = f"{path}.tmp{os.getpid()}"
    Path(tmp).write_text(json.dumps(payload))
    os.replace(tmp, path)


def load_groups(path: str | os.PathLike) -> tuple[list[DistillGroup], dict]:
    payload = json.loads(Path(path).read_text())
    groups = [DistillGroup(g["num_frames"], [DistillSample(**s) for s in g["samples"]]) for g in payload["groups"]]
    return groups, payload["meta"]


def cached_answered_groups(target, path: str | os.PathLike, meta: dict, make_plan, max_new_tokens: int,
                           progress: bool = True, desc: str = "distill answers") -> list[DistillGroup]:
    """The answered plan stored at `path` if its `meta` matches, else build, answer and store it."""
    if os.path.isfile(path):
        groups, stored = load_groups(path)
        if stored == meta:
            return groups
    groups = answer_groups(target, make_plan(), max_new_tokens, progress, desc)
    save_groups(groups, path, meta)
    return groups


# --------------------------------------------------------------------------- target states (what it saw)


@dataclass
class TargetSequences:
    """The target's view of a group, right padded to T positions per row:
    ids `[B, T]`, text_mask `[B, T]` (True at prompt/answer text), lengths `[B]`,
    answer_start `[B]` (first answer position), hidden {layer: `[B, T, H]`} (zeros at padding)."""

    ids: Tensor
    text_mask: Tensor
    lengths: Tensor
    answer_start: Tensor
    hidden: dict[int, Tensor]

    def to(self, dtype: torch.dtype) -> "TargetSequences":
        return TargetSequences(self.ids, self.text_mask, self.lengths, self.answer_start,
                               {layer: h.to(dtype) for layer, h in self.hidden.items()})


def run_target(target, group: DistillGroup, layers: Sequence[int]) -> TargetSequences:
    """Prefill [video, prompt] and run the greedy answer through `forward_tree` as one chain:
    every target the engine supports gives hidden states this way (no re-tokenizing)."""
    layers = sorted(set(int(layer) for layer in layers))
    prompts = prompts_of(group)
    answers = [s.answer_ids for s in group.samples]
    B, A = len(prompts), max(1, max(len(a) for a in answers))
    with torch.inference_mode():
        if hasattr(target, "visual_tokens_for"):                                  # the tiny VLM
            longest = max(target.visual_tokens_for(s.num_frames) + len(s.prompt_ids) for s in group.samples)
        elif callable(getattr(target, "prompt_lengths", None)):                   # HF adapters: their preprocessing
            longest = max(int(n) for n in target.prompt_lengths(prompts))
        else:                                                                     # a target that cannot count
            longest = 1 << 16
        pre = target.prefill(prompts, layers, kv_capacity(longest, 0, tree_nodes=A))   # the answer as one chain
        P = pre.lengths.to("cpu")                                                      # [B]
        tokens = torch.full((B, A), int(target.eos_token_ids[0]), dtype=torch.long)  # [B, A], padded
        for b, answer in enumerate(answers):
            tokens[b, :len(answer)] = torch.tensor(answer, dtype=torch.long)
        node = torch.arange(A)
        chain_mask = (node[None, :] <= node[:, None]).expand(B, A, A)                 # [B, A, A] causal chain
        tree = target.forward_tree(pre.state, tokens.to(target.device), chain_mask.contiguous().to(target.device),
                                   node[None].expand(B, A).contiguous().to(target.device), layers)
    T = int(max(int(P[b]) + len(answers[b]) for b in range(B)))
    ids = torch.zeros(B, T, dtype=torch.long)                                          # [B, T]
    text_mask = torch.zeros(B, T, dtype=torch.bool)                                    # [B, T]
    hidden = {layer: torch.zeros(B, T, target.hidden_size, dtype=torch.float32) for layer in layers}
    pre_ids, pre_text = pre.input_ids.to("cpu"), pre.text_mask.to("cpu")
    for b in range(B):
        p, a = int(P[b]), len(answers[b])
        ids[b, :p] = pre_ids[b, :p]
        ids[b, p:p + a] = tokens[b, :a]
        text_mask[b, :p] = pre_text[b, :p]
        text_mask[b, p:p + a] = True
        for i, layer in enumerate(layers):
            hidden[layer][b, :p] = pre.hidden[i][b, :p].float().cpu()
            hidden[layer][b, p:p + a] = tree.hidden[i][b, :a].float().cpu()
    lengths = torch.tensor([int(P[b]) + len(answers[b]) for b in range(B)], dtype=torch.long)
    return TargetSequences(ids, text_mask, lengths, P.clone().long(), hidden)


class HiddenStateStore:
    """Target states per group: computed online, or stored under `cache_dir` (fp16
    safetensors, one file per group) until `budget_mb` is used; beyond it, online again."""

    def __init__(self, target, layers: Sequence[int], cache_dir: str | None, budget_mb: float, key: str):
        self.target = target
        self.layers = sorted(set(int(layer) for layer in layers))
        self.cache_dir = cache_dir
        self.budget_bytes = int(budget_mb * 2**20)
        self.key = hashlib.sha1(f"{key}|{self.layers}".encode()).hexdigest()[:16]
        self.memory: dict[int, TargetSequences] = {}
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)

    def _path(self, index: int) -> str:
        return os.path.join(self.cache_dir, f"{self.key}_{index:06d}.safetensors")

    def used_bytes(self) -> int:
        if not self.cache_dir:
            return 0
        return sum(e.stat().st_size for e in os.scandir(self.cache_dir)
                   if e.name.startswith(self.key) and e.name.endswith(".safetensors"))

    def get(self, index: int, group: DistillGroup) -> TargetSequences:
        if self.cache_dir:
            path = self._path(index)
            if os.path.isfile(path):
                t = load_file(path)
                return TargetSequences(t["ids"], t["text_mask"].bool(), t["lengths"], t["answer_start"],
                                       {layer: t[f"hidden_{layer}"].float() for layer in self.layers})
        seqs = run_target(self.target, group, self.layers)
        if self.cache_dir and self.used_bytes() < self.budget_bytes:
            tensors = {"ids": seqs.ids, "text_mask": seqs.text_mask.to(torch.uint8), "lengths": seqs.lengths,
                       "answer_start": seqs.answer_start}
            tensors.update({f"hidden_{layer}": h.to(torch.float16) for layer, h in seqs.hidden.items()})
            tmp = f"{self._path(index)}.tmp{os.getpid()}"
            save_file(tensors, tmp)
            os.replace(tmp, self._path(index))
            seqs = seqs.to(torch.float16).to(torch.float32)   # identical values whether read back or not
        return seqs
