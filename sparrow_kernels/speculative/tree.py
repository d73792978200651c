"""EAGLE-2 dynamic draft trees: grow a tree of candidate tokens with the draft model and lay
it out for one target forward (tree mask, depths) and for the verify ops (linked lists).
Batched over rows with torch ops; the only Python loop is over tree levels. It must not
touch the target, decide acceptance or apply temperature itself (the caller's sampler does).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass
class DraftTree:
    """One draft tree per row, N nodes each, node 0 = the root (the last emitted token, not
    yet seen by the target); parents come before children and siblings are ordered by
    descending draft probability (draw order for sampled children)."""

    tokens: Tensor        # [B, N] int64 node tokens
    parents: Tensor       # [B, N] int64 parent node index, -1 at the root
    depth: Tensor         # [B, N] int64, root 0
    tree_mask: Tensor     # [B, N, N] bool, node i sees node j iff j is i or an ancestor of i
    next_token: Tensor    # [B, N] int64 first child, -1 for none
    next_sibling: Tensor  # [B, N] int64 next sibling, -1 for none
    scores: Tensor        # [B, N] float32 cumulative draft log-probability (root 0)
    draft_probs: Tensor | None  # [B, N, V] float32: distribution each node's children were drawn
    #                             from (zero rows: chosen deterministically); None = all zero

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    def positions(self, prefix_len: Tensor) -> Tensor:
        """Absolute positions `[B, N]` of the nodes after a committed prefix of `prefix_len [B]`."""
        return prefix_len[:, None] + self.depth


def tree_layout(parents: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """From `parents [B, N]` (-1 at node 0, parents[b, i] < i otherwise) compute
    depth `[B, N]`, tree_mask `[B, N, N]` (ancestor-or-self), next_token `[B, N]` (first child)
    and next_sibling `[B, N]` (next node with the same parent, by index), -1 for none."""
    B, N = parents.shape
    device = parents.device
    node = torch.arange(N, device=device)
    tree_mask = torch.eye(N, dtype=torch.bool, device=device).expand(B, N, N).clone()     # [B, N, N]
    depth = torch.zeros(B, N, dtype=torch.int64, device=device)                           # [B, N]
    ancestor = parents.clone()                                                             # [B, N]
    while bool((ancestor >= 0).any()):           # one pass per tree level, not per node
        has = ancestor >= 0
        depth += has.long()
        column = ancestor.clamp(min=0)[:, :, None]                                         # [B, N, 1]
        tree_mask.scatter_(2, column, tree_mask.gather(2, column) | has[:, :, None])
        ancestor = torch.where(has, parents.gather(1, ancestor.clamp(min=0)), -1)
    none = torch.full((), N, dtype=torch.int64, device=device)
    is_child = parents[:, None, :] == node[None, :, None]                                  # [B, N(parent), N(child)]
    first_child = torch.where(is_child, node, none).min(dim=2).values                      # [B, N]
    later_sibling = (parents[:, :, None] == parents[:, None, :]) & (node[None, None, :] > node[None, :, None])
    later_sibling &= (node > 0)[None, :, None]                                             # the root has no siblings
    sibling = torch.where(later_sibling, node, none).min(dim=2).values                     # [B, N]
    next_token = torch.where(first_child == N, -1, first_child)
    next_sibling = torch.where(sibling == N, -1, sibling)
    return depth, tree_mask, next_token, next_sibling


@dataclass(frozen=True)
class TreeShape:
    """The shape of one EAGLE-2 draft tree: `total_tokens` nodes incl. the root, `depth`
    expansion steps after the root's, `top_k` children per expanded node (top_k = 1 is a
    chain of depth + 1 drafted tokens). The one home of tree settings: validation, the node
    counts callers reserve in their caches, the per-level layout and the device presets."""

    total_tokens: int = 30
    depth: int = 3
    top_k: int = 8

    def __post_init__(self) -> None:
        for name in ("total_tokens", "depth", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"TreeShape: {name} must be an int, got {type(value).__name__}")
        if self.total_tokens < 1 or self.depth < 0 or self.top_k < 1:
            raise ValueError(f"TreeShape: need total_tokens >= 1, depth >= 0, top_k >= 1; got total_tokens="
                             f"{self.total_tokens}, depth={self.depth}, top_k={self.top_k}")

    @classmethod
    def for_device(cls, device, temperature: float = 0.0) -> "TreeShape":
        """The preset for a device: GPU_TREE on CUDA; on a CPU, CPU_TREE (a chain) for greedy
        decoding and CPU_SAMPLING_TREE when sampling (temperature > 0), where a node is accepted
        far less often and sibling candidates pay for their verification."""
        if torch.device(device).type == "cuda":
            return GPU_TREE
        return CPU_SAMPLING_TREE if temperature > 0 else CPU_TREE

    def replace(self, **changes) -> "TreeShape":
        """A copy with some fields changed; None values are ignored (unset CLI options)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict:
        return {"total_tokens": self.total_tokens, "depth": self.depth, "top_k": self.top_k}

    def __str__(self) -> str:
        return f"{self.total_tokens},{self.depth},{self.top_k}"

    def level_shapes(self, vocab_size: int, sampled: bool = False) -> list[tuple[int, int]]:
        """Per tree level (1 .. depth+1): (expanded nodes w, children per expanded node c).
        Top-k trees expand the best top_k nodes of each level by top_k children and prune to
        total_tokens - 1 drafted nodes afterwards (EAGLE-2). Sampled trees cannot be pruned by
        value without biasing the i.i.d. draws, so their shape is fixed up front to fit the
        budget. Empty for a root-only tree (total_tokens = 1)."""
        budget = self.total_tokens - 1
        if budget <= 0:
            return []
        if not sampled:
            c = min(self.top_k, vocab_size)
            shapes, prev = [(1, c)], c
            for _ in range(self.depth):
                w = min(self.top_k, prev)
                shapes.append((w, c))
                prev = w * c
            return shapes
        c1 = min(self.top_k, budget)
        shapes, remaining, prev = [(1, c1)], budget - c1, c1
        for level in range(self.depth):
            share = -(-remaining // (self.depth - level))          # ceil: fill the shallow levels first
            w = min(self.top_k, prev, share)
            if w <= 0:
                break
            c = min(self.top_k, share // w)
            shapes.append((w, c))
            remaining -= w * c
            prev = w * c
        return shapes

    def drafted_nodes(self, vocab_size: int, sampled: bool = False) -> int:
        """Nodes a tree keeps besides the root."""
        pool = sum(w * c for w, c in self.level_shapes(vocab_size, sampled))
        return min(self.total_tokens - 1, pool)

    def size(self, vocab_size: int, sampled: bool = False) -> tuple[int, int]:
        """(N nodes per tree including the root, scratch nodes the draft writes while growing
        it) for `build_tree` with this shape: the sizes callers must reserve in their caches."""
        shapes = self.level_shapes(vocab_size, sampled)
        return 1 + self.drafted_nodes(vocab_size, sampled), sum(w for w, _ in shapes[1:])


def proposal_vocab_size(draft, vocab_size: int) -> int:
    """How many ids `draft` can propose: the size of its draft vocabulary (`config.draft_vocab_size`
    > 0, EAGLE-3's draft-to-target map), else `vocab_size`. Top-k trees give a node at most this
    many children, so every drafted token lies inside the vocabulary."""
    k = getattr(getattr(draft, "config", None), "draft_vocab_size", 0)
    return min(vocab_size, int(k)) if isinstance(k, int) and k > 0 else vocab_size


# Presets. GPU: EAGLE-2's / the paper's official tree. CPU: a chain of 7 drafted tokens, the best
# shape of benchmarks/tree_sweep.py for the Qwen2.5-VL world target on a 2-core CPU from 1.5k to
# 25k visual tokens (benchmarks/RESULTS.md, "Tree shapes"): on a CPU every verified node costs
# compute (only ~4 rows ride free on a decode step's memory reads), so the top-2 branches of the
# former (12, 5, 2) preset cost more verification than the tau they add, most of all at 25k.
# When sampling, tau per node is ~half the greedy one, and the same study measured tau 2.3-2.6 with
# (12, 5, 2) against 1.9-2.1 with the chain: the CPU keeps the branching tree for T > 0.
GPU_TREE = TreeShape(total_tokens=30, depth=3, top_k=8)
CPU_TREE = TreeShape(total_tokens=8, depth=6, top_k=1)
CPU_SAMPLING_TREE = TreeShape(total_tokens=12, depth=5, top_k=2)


def _choose_children(logits: Tensor, count: int, sampler, generator) -> tuple[Tensor, Tensor, Tensor | None]:
    """Children of every expanded node: logits `[B, W, V]` -> tokens `[B, W, count]`, their
    log-probabilities `[B, W, count]` float32, and the distribution drawn from `[B, W, V]`
    (None for top-k choice)."""
    if sampler is None:
        logp = torch.log_softmax(logits.float(), dim=-1)                                  # [B, W, V]
        top = logp.topk(count, dim=-1)                                                     # sorted, descending
        return top.indices, top.values, None
    probs = sampler(logits).float()                                                        # [B, W, V]
    B, W, V = probs.shape
    drawn = torch.multinomial(probs.reshape(B * W, V), count, replacement=True,
                              generator=generator).view(B, W, count)                       # [B, W, count]
    return drawn, probs.gather(2, drawn).log(), probs


def build_tree(draft, cache, root_tokens: Tensor, root_hidden: Tensor, shape: TreeShape = GPU_TREE, *,
               sampler: Callable[[Tensor], Tensor] | None = None,
               generator: torch.Generator | None = None) -> DraftTree:
    """Grow one EAGLE-2 tree per row.

    `root_tokens [B]` are the last emitted tokens; `root_hidden [B, H]` is the draft hidden
    that predicts their children (the last committed draft entry). With `shape` =
    (total_tokens, depth, top_k): level 1 = the root's top_k children; then `depth` times:
    run `draft.draft_step` on the top_k best nodes of the newest level (by cumulative
    log-probability) and give each its top_k children. Finally keep the best
    `total_tokens - 1` drafted nodes (an ancestor-closed set: a child's score never exceeds
    its parent's, and ties go to the earlier node). So drafted nodes lie at
    depths 1 .. depth + 1, and top_k = 1 gives a chain of depth + 1 tokens.

    With `sampler` (logits `[.., V]` -> probabilities, e.g. temperature/top-p), children are
    drawn i.i.d. from the sampler's distribution (with `generator`) instead of by top-k, the
    tree shape is fixed up front (see `TreeShape.level_shapes`) and `draft_probs` holds those
    distributions, as lossless recursive rejection sampling needs.
    """
    if not isinstance(shape, TreeShape):
        raise ValueError(f"build_tree: shape must be a TreeShape, got {type(shape).__name__}")
    total_tokens = shape.total_tokens
    B = root_tokens.shape[0]
    device = root_tokens.device
    draft.reset_scratch(cache)
    if total_tokens == 1:
        return _assemble(root_tokens, torch.empty(B, 0, dtype=torch.int64, device=device),
                         torch.empty(B, 0, device=device), torch.empty(B, 0, dtype=torch.int64, device=device),
                         None, [], total_tokens, sampled=False)

    root_logits = draft.logits(root_hidden)[:, None, :]                                   # [B, 1, V]
    V = root_logits.shape[-1]
    shapes = shape.level_shapes(proposal_vocab_size(draft, V), sampled=sampler is not None)

    children, logp, probs = _choose_children(root_logits, shapes[0][1], sampler, generator)
    pool_tokens = [children.reshape(B, -1)]                                               # per level [B, size]
    pool_scores = [logp.reshape(B, -1)]
    pool_parent = [torch.full_like(pool_tokens[0], -1)]                                   # pool index, -1 = root
    expanded = [(None, probs)] if probs is not None else []                               # (pool index [B, w], dist)
    level_start, level_size = 0, shapes[0][1]
    # which hidden predicted each node of the newest level: slot into `predictor_hidden`
    predictor_hidden = root_hidden[:, None, :]                                            # [B, 1, H]
    predictor_slot = torch.zeros(B, level_size, dtype=torch.int64, device=device)        # [B, size]
    frontier_rows = None                                                                   # [B, w, M] scratch mask rows
    for level, (w, c) in enumerate(shapes[1:], start=1):
        level_scores = pool_scores[-1]                                                     # [B, size]
        local = level_scores.topk(w, dim=1).indices                                       # [B, w], best first
        frontier = level_start + local                                                     # [B, w] pool index
        frontier_tokens = pool_tokens[-1].gather(1, local)                                # [B, w]
        frontier_scores = level_scores.gather(1, local)                                   # [B, w]
        slot = predictor_slot.gather(1, local)                                             # [B, w]
        prev_hidden = predictor_hidden.gather(1, slot[:, :, None].expand(B, w, predictor_hidden.shape[-1]))
        own = torch.eye(w, dtype=torch.bool, device=device).expand(B, w, w)
        if frontier_rows is None:
            step_mask = own.contiguous()                                                   # [B, w, w]
        else:                  # a frontier node's parent sits in the previous frontier, at `slot`
            inherited = frontier_rows.gather(1, slot[:, :, None].expand(B, w, frontier_rows.shape[-1]))
            step_mask = torch.cat([inherited, own], dim=2)                                 # [B, w, M]
        node_depth = torch.full((B, w), level, dtype=torch.int64, device=device)
        hidden = draft.draft_step(cache, frontier_tokens, prev_hidden, node_depth, step_mask)  # [B, w, H]
        children, logp, probs = _choose_children(draft.logits(hidden), c, sampler, generator)  # [B, w, c]
        pool_tokens.append(children.reshape(B, w * c))
        pool_scores.append((frontier_scores[:, :, None] + logp).reshape(B, w * c))
        pool_parent.append(frontier.repeat_interleave(c, dim=1))
        if probs is not None:
            expanded.append((frontier, probs))
        frontier_rows = step_mask
        predictor_hidden = hidden
        predictor_slot = torch.arange(w, device=device).repeat_interleave(c)[None].expand(B, w * c)
        level_start += level_size
        level_size = w * c
    return _assemble(root_tokens, torch.cat(pool_tokens, 1), torch.cat(pool_scores, 1),
                     torch.cat(pool_parent, 1), V, expanded, total_tokens, sampled=sampler is not None)


def _assemble(root_tokens: Tensor, pool_tokens: Tensor, pool_scores: Tensor, pool_parent: Tensor,
              vocab_size: int | None, expanded: list, total_tokens: int, sampled: bool) -> DraftTree:
    """Select the kept pool nodes, number them (root first, then pool order: by level, by
    parent rank, by sibling rank) and compute the layout."""
    B, P = pool_tokens.shape
    device = root_tokens.device
    n_draft = min(total_tokens - 1, P)
    if sampled or n_draft == P:
        selected = torch.arange(P, device=device).expand(B, P)                             # keep all
    else:
        # stable sort: equal scores keep pool order, so a parent always precedes its child
        best = torch.sort(pool_scores, dim=1, descending=True, stable=True).indices[:, :n_draft]
        selected = torch.sort(best, dim=1).values                                          # [B, n_draft]
    N = n_draft + 1
    node_of_pool = torch.full((B, P), -1, dtype=torch.int64, device=device)               # [B, P]
    node_of_pool.scatter_(1, selected, torch.arange(1, N, device=device).expand(B, n_draft))
    parent_pool = pool_parent.gather(1, selected)                                          # [B, n_draft]
    parent_node = torch.where(parent_pool < 0, 0, node_of_pool.gather(1, parent_pool.clamp(min=0)))
    if bool((parent_node < 0).any()):
        raise RuntimeError("build_tree: the kept nodes are not ancestor-closed (a parent was pruned)")
    tokens = torch.cat([root_tokens[:, None], pool_tokens.gather(1, selected)], dim=1)     # [B, N]
    parents = torch.cat([torch.full((B, 1), -1, dtype=torch.int64, device=device), parent_node], dim=1)
    scores = torch.cat([torch.zeros(B, 1, device=device), pool_scores.gather(1, selected).float()], dim=1)
    depth, tree_mask, next_token, next_sibling = tree_layout(parents)
    draft_probs = None
    if sampled and expanded:
        draft_probs = torch.zeros(B, N, vocab_size, dtype=torch.float32, device=device)  # [B, N, V]
        for frontier, probs in expanded:
            node = torch.zeros(B, 1, dtype=torch.int64, device=device) if frontier is None \
                else node_of_pool.gather(1, frontier)                                      # [B, w]
            draft_probs.scatter_(1, node[:, :, None].expand(-1, -1, vocab_size), probs.float())
    return DraftTree(tokens=tokens, parents=parents, depth=depth, tree_mask=tree_mask, next_token=next_token,
                     next_sibling=next_sibling, scores=scores, draft_probs=draft_probs)


__all__ = ["CPU_SAMPLING_TREE", "CPU_TREE", "DraftTree", "GPU_TREE", "TreeShape", "build_tree", "proposal_vocab_size",
           "tree_layout"]
