"""The CPU fast path of the draft phase: `build_tree` (top-k trees) and `SparrowDraft.extend`
for a few entries, run by the compiled `torch.ops.sparrow_cpu.*` (csrc/draft_cpu.cpp) as fused
loops instead of ~100 eager ops per draft forward. Same results as the Python code up to float
rounding (tests/draft/test_cpu_draft.py), so it is an engine detail, never a semantic change.

It only decides whether the fast path applies and marshals weights; it must not be called
with gradients enabled, and it returns None (the caller then runs the Python path) for
anything it does not cover: CUDA, non-fp32, sampled trees, vocabularies too large to
tabulate, an LM head that is not `Sequential(RMSNorm, Linear)`, or `SPARROW_CPU_DRAFT=0`.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from .draft import DraftCache, SparrowDraft
from .tree import DraftTree, TreeShape

MAX_EXTEND_ENTRIES = 64      # longer extends (prompt passes) are better served by SDPA


def _has_ops() -> bool:
    try:
        return hasattr(torch.ops.sparrow_cpu, "draft_tree")
    except (AttributeError, RuntimeError):
        return False


# RMSNorms computing x / rms(x) * weight (fp32 statistics): torch's, the tiny VLM's and HF's
# Llama/Qwen2 ones. Not Gemma's (x * (1 + weight)), so the head is matched by class name.
RMS_NORM_CLASSES = ("RMSNorm", "LlamaRMSNorm", "Qwen2RMSNorm")


def _norm_eps(norm: nn.Module) -> float | None:
    if isinstance(norm, nn.RMSNorm) and norm.eps is None:
        return float(torch.finfo(torch.float32).eps)          # nn.RMSNorm's default for fp32
    for name in ("eps", "variance_epsilon"):
        value = getattr(norm, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _head_parts(draft: SparrowDraft) -> tuple[Tensor, Tensor, float] | None:
    """(final norm weight [H], LM head weight [V, H], eps) when the target's LM head is
    Sequential(RMSNorm with weight, bias-free Linear), else None."""
    head = draft.frozen.lm_head
    if not isinstance(head, nn.Sequential) or len(head) != 2:
        return None
    norm, linear = head[0], head[1]
    eps = _norm_eps(norm)
    weight = getattr(norm, "weight", None)
    if eps is None or not isinstance(weight, Tensor) or not isinstance(linear, nn.Linear) or linear.bias is not None:
        return None
    if type(norm).__name__ not in RMS_NORM_CLASSES:
        return None
    return weight, linear.weight, eps


def _weights(draft: SparrowDraft) -> tuple[list[Tensor], list[float]] | None:
    """The 11 weights in csrc/draft_cpu.cpp's order and the 4 norm epsilons, or None."""
    table = draft._token_table()
    head = _head_parts(draft)
    if table is None or head is None:
        return None
    final_w, lm_w, final_eps = head
    feature_fc = draft._feature_fc()
    fuse = draft._fused("fuse", draft.feature_fuse) if draft.feature_fuse is not None else \
        torch.empty(0, dtype=table.dtype, device=table.device)
    weights = [table, feature_fc, fuse, draft.input_norm.weight.detach(),
               draft._fused("qkv", draft.q_proj, draft.k_proj, draft.v_proj), draft._fused("o", draft.o_proj),
               draft.post_attn_norm.weight.detach(), draft._fused("gate_up", draft.gate_proj, draft.up_proj),
               draft._fused("down", draft.down_proj), final_w.detach(), lm_w.detach()]
    if any(w is None or w.dtype != torch.float32 or w.device.type != "cpu" for w in weights):
        return None
    weights = [w if w.is_contiguous() else w.contiguous() for w in weights]
    eps = [draft.feature_norm.eps, draft.input_norm.eps, draft.post_attn_norm.eps, final_eps]
    if any(e is None for e in eps):
        return None
    return weights, [float(e) for e in eps]


def _supported(draft) -> bool:
    if os.environ.get("SPARROW_CPU_DRAFT", "1") == "0" or torch.is_grad_enabled():
        return False
    if not isinstance(draft, SparrowDraft):       # any other object implementing docs/draft_api.md
        return False
    return draft.device.type == "cpu" and draft.dtype == torch.float32 and _has_ops()


class CompiledDraft:
    """A draft's weights marshalled once for the sparrow_cpu ops (make it with `prepare`, per
    generate call: it holds the weights as they were then). Its methods return None for
    inputs the fast path does not cover, so the caller runs the Python path instead."""

    def __init__(self, draft: SparrowDraft, weights: list[Tensor], eps: list[float]):
        cfg = draft.config
        self.draft, self.weights, self.eps = draft, weights, eps
        self.layer_args = (cfg.num_heads, cfg.num_kv_heads, float(cfg.rope_theta), int(cfg.window), int(cfg.n_anchor))
        self._shapes: dict = {}

    def _tree_plan(self, shape: TreeShape):
        """(widths, counts, drafted nodes, scratch depth - 1 per scratch node) of a top-k tree."""
        if shape not in self._shapes:
            vocab = self.draft.config.vocab_size
            levels = shape.level_shapes(vocab)
            level = [lvl for lvl, (w, _) in enumerate(levels) if lvl > 0 for _ in range(w)]
            self._shapes[shape] = ([w for w, _ in levels], [c for _, c in levels], shape.drafted_nodes(vocab),
                                   torch.tensor(level, dtype=torch.int64) - 1)
        return self._shapes[shape]

    def build_tree(self, cache: DraftCache, root_tokens: Tensor, root_hidden: Tensor,
                   shape: TreeShape) -> DraftTree | None:
        """`tree.build_tree` with top-k children (no sampler) through sparrow_cpu.draft_tree;
        leaves the cache's scratch state as build_tree does."""
        if shape.total_tokens <= 1 or not isinstance(cache, DraftCache) or not isinstance(root_hidden, Tensor) \
                or not isinstance(root_tokens, Tensor):
            return None
        if not (cache.k.is_contiguous() and cache.v.is_contiguous()) or root_hidden.dtype != torch.float32:
            return None
        B = cache.batch_size
        if root_tokens.shape != (B,) or root_hidden.shape != (B, self.draft.config.hidden_size) \
                or root_tokens.device.type != "cpu" or root_hidden.device.type != "cpu":
            return None                                   # the Python path raises the precise error
        widths, counts, n_draft, scratch_depth = self._tree_plan(shape)
        scratch = len(scratch_depth)
        if bool((cache.lengths + scratch > cache.capacity).any()):
            raise ValueError(f"build_tree: {scratch} scratch nodes after the committed slots exceed the draft "
                             f"cache capacity {cache.capacity} (max committed {int(cache.lengths.max())})")
        self.draft.reset_scratch(cache)
        tokens, parents, scores, node_depth, tree_mask, next_token, next_sibling = torch.ops.sparrow_cpu.draft_tree(
            self.weights, cache.k, cache.v, cache.lengths, root_tokens.to(torch.int64), root_hidden.contiguous(),
            widths, counts, n_draft, self.eps, *self.layer_args)
        if scratch:
            cache.scratch_pos = cache.lengths[:, None] + scratch_depth[None, :]           # [B, M]
            cache.scratch_len = scratch
        return DraftTree(tokens=tokens, parents=parents, depth=node_depth, tree_mask=tree_mask,
                         next_token=next_token, next_sibling=next_sibling, scores=scores, draft_probs=None)

    def extend(self, cache: DraftCache, tokens: Tensor, features: Tensor, valid: Tensor) -> Tensor | None:
        """`SparrowDraft.extend` for up to MAX_EXTEND_ENTRIES entries through
        sparrow_cpu.draft_extend. Hidden states of padding entries (>= valid[b]) are zero."""
        if not isinstance(cache, DraftCache) or not all(isinstance(t, Tensor) for t in (tokens, features, valid)):
            return None
        if tokens.dim() != 2 or features.dim() != 3 or valid.shape != tokens.shape[:1] or tokens.shape[1] == 0 \
                or tokens.shape[1] > MAX_EXTEND_ENTRIES:
            return None
        if any(t.device.type != "cpu" for t in (tokens, features, valid)):
            return None
        if features.dtype != torch.float32 or tokens.dtype != torch.int64 or valid.dtype != torch.int64:
            return None
        if features.shape[:2] != tokens.shape or features.shape[2] != self.draft.config.feature_size:
            return None
        if not (cache.k.is_contiguous() and cache.v.is_contiguous()) or cache.batch_size != tokens.shape[0]:
            return None
        new_lengths = cache.lengths + valid.clamp(0, tokens.shape[1])
        if bool((new_lengths > cache.capacity).any()):
            b = int((new_lengths > cache.capacity).nonzero()[0, 0])
            raise ValueError(f"SparrowDraft.extend: row {b} needs {int(new_lengths[b])} draft cache slots "
                             f"but the cache capacity is {cache.capacity}")
        self.draft.reset_scratch(cache)
        lengths = cache.lengths.contiguous().clone()
        hidden = torch.ops.sparrow_cpu.draft_extend(self.weights, cache.k, cache.v, lengths, tokens, features, valid,
                                                    self.eps, *self.layer_args)
        cache.lengths = lengths
        return hidden


def prepare(draft) -> CompiledDraft | None:
    """The compiled CPU draft phase for `draft`, or None when it does not apply (CUDA,
    non-fp32, gradients on, an unsupported LM head or vocabulary, SPARROW_CPU_DRAFT=0)."""
    if not _supported(draft):
        return None
    prepared = _weights(draft)
    return None if prepared is None else CompiledDraft(draft, *prepared)


def available(draft) -> bool:
    """Whether the fast path can run this draft now."""
    return prepare(draft) is not None


def build_tree(draft, cache: DraftCache, root_tokens: Tensor, root_hidden: Tensor,
               shape: TreeShape) -> DraftTree | None:
    """One-off `CompiledDraft.build_tree` (prepare + call); None when the fast path does not apply."""
    compiled = prepare(draft)
    return None if compiled is None else compiled.build_tree(cache, root_tokens, root_hidden, shape)


def extend(draft, cache: DraftCache, tokens: Tensor, features: Tensor, valid: Tensor) -> Tensor | None:
    """One-off `CompiledDraft.extend` (prepare + call); None when the fast path does not apply."""
    compiled = prepare(draft)
    return None if compiled is None else compiled.extend(cache, tokens, features, valid)


__all__ = ["MAX_EXTEND_ENTRIES", "CompiledDraft", "available", "build_tree", "extend", "prepare"]
