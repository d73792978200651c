"""The draft interface: what the draft/verify engine needs from a draft model, and what it
needs from the runner that executes a draft's phase for one generate call. This module
holds protocols only: it must not import a concrete draft (draft.py), the engine or a
target, and it holds no state. docs/draft_api.md describes SparrowDraft's side in full.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from sparrow_kernels.speculative.tree import DraftTree


class DraftSettings(Protocol):
    """The part of a draft's config the engine reads (DraftConfig provides all of it)."""

    vocab_size: int                       # must equal the target's
    feature_layers: Sequence[int]         # target layers whose hidden states feed the draft
    visual_kv: bool                       # True: visual prompt positions enter the draft cache too
    visual_feature_layer: int | None      # target layer feeding the visual entries (with visual_kv)
    # optional: draft_vocab_size (int, 0 = whole vocabulary): how many ids logits() leaves finite;
    # top-k trees then give a node at most that many children (tree.proposal_vocab_size)


@runtime_checkable
class Draft(Protocol):
    """What the engine needs from a draft. Entries follow the EAGLE shift (draft_inputs): entry
    t pairs the target feature at a kept position with the token at the next kept position.

    - prompt pass and extend over accepted tokens: `extend` commits entries to the cache;
    - tree growth: `logits` of a hidden state, `draft_step` expands tree nodes into the
      cache's scratch area without committing them (tree.build_tree drives both).
    """

    config: DraftSettings
    device: torch.device
    dtype: torch.dtype

    def new_cache(self, batch_size: int, capacity: int):
        """An empty cache with room for `capacity` entries (committed + scratch) per row."""
        ...

    def extend(self, cache, tokens: Tensor, features: Tensor, valid: Tensor) -> Tensor:
        """Commit entries: tokens `[B, T]`, target features `[B, T, F]`, valid `[B]` (right
        padding). Drops the scratch nodes first. Returns draft hidden `[B, T, H]`; entry
        valid[b] - 1 of row b predicts the next token."""
        ...

    def draft_step(self, cache, tokens: Tensor, prev_hidden: Tensor, depth: Tensor, tree_mask: Tensor) -> Tensor:
        """Expand K tree nodes per row into the scratch area (not committed): tokens `[B, K]`,
        prev_hidden `[B, K, H]`, depth `[B, K]` >= 1, tree_mask `[B, K, M]` over all M scratch
        nodes so far. Returns hidden `[B, K, H]`."""
        ...

    def logits(self, hidden: Tensor) -> Tensor:
        """The target's final norm + LM head: `[.., H]` -> `[.., V]`."""
        ...

    def reset_scratch(self, cache) -> None:
        """Forget the scratch (tree) nodes of the cache."""
        ...


class DraftRunner(Protocol):
    """The draft phase of one generate call, bound to a draft, a tree shape and (for sampled
    trees) a sampler: runner.draft_runner picks the Python path or the compiled CPU path once."""

    def extend(self, cache, tokens: Tensor, features: Tensor, valid: Tensor) -> Tensor:
        """Draft.extend (hidden states of padding entries may be zero)."""
        ...

    def build_tree(self, cache, root_tokens: Tensor, root_hidden: Tensor) -> DraftTree:
        """One tree per row from `root_tokens [B]` and the hidden `root_hidden [B, H]` that
        predicts their children (tree.build_tree's contract)."""
        ...


__all__ = ["Draft", "DraftRunner", "DraftSettings"]
