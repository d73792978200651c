"""The target interface: what the draft/verify engine needs from a target Video LLM.

A target owns its weights, its KV cache and its position scheme (RoPE / M-RoPE); the
engine only speaks in tokens, tree masks, depths and accepted node indices. This module
must not import any concrete model (tiny VLM, transformers) and holds no state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import torch


@dataclass
class VideoPrompt:
    """One request: a video and a text prompt.

    `frames` is `[T, H, W, 3]` uint8 (RGB) or float in [0, 1]; adapters resize/sample
    as their model needs. `prompt` is text (HF targets) or already-tokenized ids
    (`prompt_ids`, the tiny VLM accepts both). `fps` is the rate the frames were sampled at
    (frames per second of the clip's time, e.g. T / duration for T evenly spaced frames);
    targets with time-aligned positions (Qwen2.5-VL) use it, None means the adapter's default.
    """

    frames: torch.Tensor
    prompt: str | None = None
    prompt_ids: torch.Tensor | None = None
    fps: float | None = None


@dataclass
class TargetState:
    """Per-batch decoding state owned by the target (its cache and lengths).

    `lengths [B]` int64: committed tokens per row (prompt + accepted output), i.e. the
    number of valid KV slots. Targets may subclass and add fields (cache objects, rope
    offsets). The engine reads `lengths` and never edits anything here directly.
    """

    lengths: torch.Tensor
    capacity: int


@dataclass
class PrefillOutput:
    state: TargetState
    logits: torch.Tensor            # [B, V] logits at each row's last prompt position
    hidden: list[torch.Tensor]      # per requested layer: [B, T, H] (padded rows zero)
    input_ids: torch.Tensor         # [B, T] token ids; visual positions hold the model's video token id
    text_mask: torch.Tensor         # [B, T] bool: True at text positions, False at visual and padding
    lengths: torch.Tensor           # [B] int64 prompt length per row (right padding)


@dataclass
class TreeOutput:
    logits: torch.Tensor            # [B, N, V] target logits at every tree node
    hidden: list[torch.Tensor]      # per requested layer: [B, N, H]


@runtime_checkable
class Target(Protocol):
    """What a target must provide. Layers are numbered 0..num_layers where 0 is the
    embedding output and num_layers the last decoder layer's (pre final-norm) output,
    as in HF `output_hidden_states`.

    Optional: `prompt_lengths(prompts) -> list[int]`, the tokens each prompt occupies after
    prefill, computed without a forward; when present the engine sizes the KV cache exactly
    (both built-in target families provide it)."""

    num_layers: int
    hidden_size: int
    vocab_size: int
    eos_token_ids: Sequence[int]
    device: torch.device
    dtype: torch.dtype

    def embed_tokens(self) -> torch.nn.Module: ...        # token id -> [.., H] (frozen, reused by the draft)
    def lm_head(self) -> torch.nn.Module: ...             # final norm + LM head: [.., H] -> [.., V]

    def prefill(self, prompts: Sequence[VideoPrompt], layers: Sequence[int], capacity: int) -> PrefillOutput:
        """Run the prompt(s) and fill a cache with room for `capacity` tokens per row.
        Raises ValueError if a prompt (plus one token) does not fit `capacity`."""
        ...

    def forward_tree(self, state: TargetState, tokens: torch.Tensor, tree_mask: torch.Tensor,
                     depth: torch.Tensor, layers: Sequence[int]) -> TreeOutput:
        """Append `tokens [B, N]` (a draft tree per row, node 0 = root, parents before
        children) after each row's committed prefix. `tree_mask [B, N, N]` bool: node i
        sees node j (ancestors and itself). `depth [B, N]` int64: node depth (root 0);
        the node's position is the row's next position + depth. Writes the nodes' K/V to
        slots `lengths[b] + i` without committing them (lengths unchanged).
        Plain decoding is N = 1 with tree_mask = [[True]]."""
        ...

    def commit(self, state: TargetState, accept_index: torch.Tensor, accept_len: torch.Tensor) -> None:
        """Keep the accepted nodes of the last forward_tree (`accept_index [B, A]`,
        padded -1, `accept_len [B]`) via `sparrow_kernels.ops.kv_compact` and advance
        `state.lengths` by `accept_len`."""
        ...
