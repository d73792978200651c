"""The CPU fast path of the draft phase: `build_tree` (top-k trees) and `SparrowDraft.extend`
for a few entries, run by the compiled `torch.ops.sparrow_cpu.*` (csrc/draft_cpu.cpp) as fused
loops instead of ~100 eager ops per draft forward. Same results as the Python code up to float
rounding (tests/speculative/test_cpu_draft.py), so it is an engine detail, never a semantic change.

`prepare` decides once per generate call whether it applies (a SparrowDraft on the CPU in fp32
with a tabulable vocabulary and an LM head of `Sequential(RMSNorm, Linear)`, gradients off, the
ops built, `SPARROW_CPU_DRAFT` not 0) and marshals the weights by name (with a draft vocabulary:
its ids and their LM-head rows); runner.draft_runner calls it. It reads only SparrowDraft's public
inference API, tree.TreeShape and tree.proposal_vocab_size.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from .draft import DraftCache, SparrowDraft
from .tree import DraftTree, TreeShape, build_tree, proposal_vocab_size

MAX_EXTEND_ENTRIES = 64      # longer extends (prompt passes) are better served by SDPA


def _has_ops() -> bool:
    try:
        return hasattr(torch.ops.sparrow_cpu, "draft_tree")
    except (AttributeError, RuntimeError):
        return False


# RMSNorms computing x / rms(x) * weight (fp32 statistics): torch's, the tiny VLM's and HF's
# Llama / Qwen2 (LLaVA-OneVision's LM) / Qwen2-VL / Qwen2.5-VL ones. Not Gemma's (x * (1 + weight)),
# so the head is matched by class name.
RMS_NORM_CLASSES = ("RMSNorm", "LlamaRMSNorm", "Qwen2RMSNorm", "Qwen2VLRMSNorm", "Qwen2_5_VLRMSNorm")


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


def _weights(draft: SparrowDraft) -> tuple[dict[str, Tensor], dict[str, float]] | None:
    """The weights by the names of csrc/draft_cpu.cpp's `weights` dict, and the norm epsilons
    by its argument names; None when the draft or its LM head is not covered. With a draft
    vocabulary, `lm_head` holds only its rows and `vocab` the target ids they stand for."""
    weights = draft.inference_weights()
    head = _head_parts(draft)
    if weights is None or head is None:
        return None
    final_w, lm_w, final_eps = head
    vocab = draft.draft_vocab
    lm_rows = lm_w.detach() if vocab is None else draft.vocab_head_rows()
    weights = {**weights, "final_norm": final_w.detach(), "lm_head": lm_rows}
    if any(w is None or w.dtype != torch.float32 or w.device.type != "cpu" for w in weights.values()):
        return None
    weights = {name: w.contiguous() for name, w in weights.items()}
    if vocab is not None:
        weights["vocab"] = vocab.to("cpu", torch.int64).clone()       # a snapshot, like the rows
    eps = {"eps_feature": draft.feature_norm.eps, "eps_input": draft.input_norm.eps,
           "eps_post": draft.post_attn_norm.eps, "eps_final": final_eps}
    if any(e is None for e in eps.values()):
        return None
    return weights, {name: float(e) for name, e in eps.items()}


def _supported(draft) -> bool:
    if os.environ.get("SPARROW_CPU_DRAFT", "1") == "0" or torch.is_grad_enabled():
        return False
    if not isinstance(draft, SparrowDraft):       # any other object implementing docs/draft_api.md
        return False
    return draft.device.type == "cpu" and draft.dtype == torch.float32 and _has_ops()


class CompiledDraft:
    """A runner (draft_base.DraftRunner) of the draft phase through the sparrow_cpu ops for one
    draft and one top-k tree shape; make it with `prepare`, per generate call (it holds the
    weights as they were then). Routing, fixed by the inputs' size only: extends longer than
    MAX_EXTEND_ENTRIES (prompt passes) and root-only trees run through the Python code, which
    serves them better. Bad inputs raise ValueError naming the argument."""

    def __init__(self, draft: SparrowDraft, shape: TreeShape, weights: dict[str, Tensor], eps: dict[str, float]):
        cfg = draft.config
        self.draft, self.shape, self.weights, self.eps = draft, shape, weights, eps
        self.layer_args = dict(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                               rope_theta=float(cfg.rope_theta), window=int(cfg.window), n_anchor=int(cfg.n_anchor))
        proposals = proposal_vocab_size(draft, cfg.vocab_size)           # K with a draft vocabulary
        levels = shape.level_shapes(proposals)
        self.widths, self.counts = [w for w, _ in levels], [c for _, c in levels]
        self.n_draft = shape.drafted_nodes(proposals)
        level = [lvl for lvl, (w, _) in enumerate(levels) if lvl > 0 for _ in range(w)]
        self.scratch_depth = torch.tensor(level, dtype=torch.int64) - 1          # [M] depth - 1 per scratch node

    def _check(self, name: str, t, shape: tuple, dtype: torch.dtype | None) -> None:
        if not isinstance(t, Tensor) or t.dim() != len(shape) or \
                any(s is not None and s != n for s, n in zip(shape, t.shape)):
            shown = "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"
            got = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"cpu_draft: {name} must have shape {shown}, got {got}")
        if (dtype is not None and t.dtype != dtype) or t.device.type != "cpu":
            raise ValueError(f"cpu_draft: {name} must be a {dtype} CPU tensor, got {t.dtype} on {t.device}")

    def _check_cache(self, cache, B: int) -> None:
        if not isinstance(cache, DraftCache) or cache.batch_size != B:
            raise ValueError(f"cpu_draft: cache must be a DraftCache of batch {B} (from SparrowDraft.new_cache)")
        if not (cache.k.is_contiguous() and cache.v.is_contiguous()):
            raise ValueError("cpu_draft: the cache's k and v must be contiguous (as SparrowDraft.new_cache makes them)")
        bad = (cache.lengths < 0) | (cache.lengths > cache.capacity)
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise ValueError(f"cpu_draft: cache.lengths[{b}] must be in [0, {cache.capacity}] (the capacity), "
                             f"got {int(cache.lengths[b])}")

    def build_tree(self, cache: DraftCache, root_tokens: Tensor, root_hidden: Tensor) -> DraftTree:
        """`tree.build_tree` with top-k children through sparrow_cpu.draft_tree; leaves the
        cache's scratch state as build_tree does."""
        if self.shape.total_tokens <= 1:          # no draft forward at all
            return build_tree(self.draft, cache, root_tokens, root_hidden, self.shape)
        self._check("root_tokens", root_tokens, (None,), torch.int64)
        B = root_tokens.shape[0]
        self._check("root_hidden", root_hidden, (B, self.draft.config.hidden_size), torch.float32)
        self._check_cache(cache, B)
        scratch = len(self.scratch_depth)
        if bool((cache.lengths > cache.capacity - scratch).any()):
            raise ValueError(f"build_tree: {scratch} scratch nodes after the committed slots exceed the draft "
                             f"cache capacity {cache.capacity} (max committed {int(cache.lengths.max())})")
        self.draft.reset_scratch(cache)
        tokens, parents, scores, node_depth, tree_mask, next_token, next_sibling = torch.ops.sparrow_cpu.draft_tree(
            self.weights, cache.k, cache.v, cache.lengths, root_tokens, root_hidden.contiguous(),
            self.widths, self.counts, self.n_draft, **self.eps, **self.layer_args)
        if scratch:
            cache.scratch_pos = cache.lengths[:, None] + self.scratch_depth[None, :]      # [B, M]
            cache.scratch_len = scratch
        return DraftTree(tokens=tokens, parents=parents, depth=node_depth, tree_mask=tree_mask,
                         next_token=next_token, next_sibling=next_sibling, scores=scores, draft_probs=None)

    def extend(self, cache: DraftCache, tokens: Tensor, features: Tensor, valid: Tensor) -> Tensor:
        """`SparrowDraft.extend` through sparrow_cpu.draft_extend for up to MAX_EXTEND_ENTRIES
        entries (longer ones through SparrowDraft.extend). Hidden states of padding entries
        (>= valid[b]) are zero."""
        self._check("tokens", tokens, (None, None), torch.int64)
        B, T = tokens.shape
        if T == 0 or T > MAX_EXTEND_ENTRIES:
            return self.draft.extend(cache, tokens, features, valid)
        self._check("features", features, (B, T, self.draft.config.feature_size), None)
        self._check("valid", valid, (B,), torch.int64)
        self._check_cache(cache, B)
        n = valid.clamp(0, T)
        over = cache.lengths > cache.capacity - n            # no addition: lengths in [0, capacity] here
        if bool(over.any()):
            b = int(over.nonzero()[0, 0])
            raise ValueError(f"SparrowDraft.extend: row {b} needs {int(cache.lengths[b]) + int(n[b])} draft cache "
                             f"slots but the cache capacity is {cache.capacity}")
        self.draft.reset_scratch(cache)
        lengths = cache.lengths.contiguous().clone()
        hidden = torch.ops.sparrow_cpu.draft_extend(self.weights, cache.k, cache.v, lengths, tokens,
                                                    features.to(torch.float32), valid, **self.eps, **self.layer_args)
        cache.lengths = lengths
        return hidden


def prepare(draft, shape: TreeShape) -> CompiledDraft | None:
    """The compiled CPU draft phase for `draft` and top-k trees of `shape`, or None when it
    does not apply (CUDA, non-fp32, gradients on, an unsupported LM head or vocabulary, an
    object other than SparrowDraft, SPARROW_CPU_DRAFT=0)."""
    if not _supported(draft):
        return None
    prepared = _weights(draft)
    return None if prepared is None else CompiledDraft(draft, shape, *prepared)


def available(draft) -> bool:
    """Whether the fast path can run this draft now."""
    return prepare(draft, TreeShape()) is not None


__all__ = ["MAX_EXTEND_ENTRIES", "CompiledDraft", "available", "prepare"]
