"""The "sparrow" attention implementation of transformers: `torch.ops.sparrow.window_attn` behind
`AttentionInterface` (the attention function) and `AttentionMaskInterface` (a mask function that
hands the op its structure, `WindowAttnMask`, instead of a dense mask), for stock models such as
Qwen2.5-VL and LLaVA-OneVision. Any mask the op cannot express exactly goes to transformers' own
SDPA function unchanged. Must not copy or patch modeling code; knows no draft or engine.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Iterator

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)
from transformers.modeling_utils import AttentionInterface

from sparrow_kernels import ops
from sparrow_kernels.ops import backend

NAME = "sparrow"
# "auto" routing: the op serves forwards of at most this many queries per row over a longer
# key range (decode and tree verification over a KV cache); longer query blocks (prefill, the
# vision towers) go to SDPA, which is faster there on the CPU (docs/hf_attention.md).
MAX_OP_QUERIES = 64
ROUTES = ("auto", "op", "sdpa")
OP_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_route: contextvars.ContextVar[str] = contextvars.ContextVar("sparrow_hf_attention_route", default="auto")


@contextlib.contextmanager
def attention_route(route: str) -> Iterator[None]:
    """Where "sparrow" attention runs inside the block: `auto` (the op for decode and tree
    verification, SDPA for long query blocks), `op` (the op for every mask it can express
    exactly) or `sdpa` (always SDPA with the equivalent mask: an A/B switch)."""
    if route not in ROUTES:
        raise ValueError(f"attention_route: route must be one of {', '.join(ROUTES)}, got {route!r}")
    token = _route.set(route)
    try:
        yield
    finally:
        _route.reset(token)


@dataclass(eq=False)
class WindowAttnMask:
    """The attention pattern in the op's terms (docs/ops.md, window_attn with no window and no
    anchors): key slot j of row b is visible to query i iff `j < kv_len[b]` and, for the last Tq
    valid slots when `tree_mask` is given, `tree_mask[b, i, j - (kv_len[b] - Tq)]`, else
    `j <= q_pos[b, i]`. `key_slots` is the Tk it was built for (checked against every layer's
    keys). `sdpa_is_causal` says that SDPA may run with no mask and that `is_causal` (None: the
    mask must be built for SDPA)."""

    kv_len: torch.Tensor                     # [B] int64
    q_pos: torch.Tensor                      # [B, Tq] int64
    key_slots: int
    tree_mask: torch.Tensor | None = None    # [B, Tq, Tq] bool
    sdpa_is_causal: bool | None = None
    _dense: dict = field(default_factory=dict, repr=False)

    def dense(self, kv_length: int) -> torch.Tensor:
        """The same pattern as a bool mask `[B, 1, Tq, kv_length]` (True = visible) for SDPA,
        built once per forward and shared by the layers."""
        if kv_length not in self._dense:
            batch, queries = self.q_pos.shape
            slots = torch.arange(kv_length, device=self.q_pos.device)
            visible = (slots[None, None, :] <= self.q_pos[:, :, None]) & \
                (slots[None, None, :] < self.kv_len[:, None, None])  # [B, Tq, Tk]
            if self.tree_mask is not None:
                rel = slots[None, :] - (self.kv_len - queries)[:, None]  # [B, Tk] node index of each slot
                in_tree = (rel >= 0) & (rel < queries)
                tree_visible = torch.gather(self.tree_mask, 2,
                                            rel.clamp(0, queries - 1)[:, None, :].expand(batch, queries, kv_length))
                visible = torch.where(in_tree[:, None, :], tree_visible, visible & ~in_tree[:, None, :])
            self._dense[kv_length] = visible[:, None]  # [B, 1, Tq, Tk]
        return self._dense[kv_length]


def tree_mask_structure(lengths: torch.Tensor, slot_count: int, tree_mask: torch.Tensor) -> WindowAttnMask:
    """The pattern of a tree forward over a right-padded cache: row b's committed slots
    `< lengths[b]` are visible to every node, its padding slots `[lengths[b], slot_count)` to
    none, and the N nodes (slots `slot_count..slot_count+N-1`) see each other by `tree_mask
    [B, N, N]`. The padding is excluded through the positions: `q_pos = lengths - 1`."""
    batch, nodes = tree_mask.shape[:2]
    kv_len = torch.full((batch,), slot_count + nodes, dtype=torch.long, device=lengths.device)
    q_pos = (lengths - 1)[:, None].expand(batch, nodes).contiguous()  # [B, N]
    return WindowAttnMask(kv_len=kv_len, q_pos=q_pos, key_slots=slot_count + nodes, tree_mask=tree_mask.contiguous())


# ----------------------------------------------------------------------------- mask function
def _valid_prefix_lengths(attention_mask: torch.Tensor | None, batch: int, kv_length: int,
                          device) -> torch.Tensor | None:
    """Per row the number of valid key slots when the 2-D padding mask is a prefix of ones
    (no padding, or right padding); None when it is not (left padding, holes, empty rows)."""
    if attention_mask is None:
        return torch.full((batch,), kv_length, dtype=torch.long, device=device)
    padding = prepare_padding_mask(attention_mask, kv_length, 0)[:, :kv_length].to(device=device, dtype=torch.bool)
    counts = padding.sum(-1)  # [B]
    prefix = torch.arange(kv_length, device=device)[None, :] < counts[:, None]
    if not bool(torch.equal(padding, prefix)) or bool((counts < 1).any()):
        return None
    return counts.to(torch.long)


def window_attn_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                     mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None,
                     device="cpu", **kwargs):
    """`AttentionMaskInterface` entry: a `WindowAttnMask` for the plain causal and bidirectional
    patterns with no or right padding; for anything else (composed mask functions, left
    padding, sliding-window caches, tracing) exactly the mask the "sdpa" implementation gets."""
    plain = mask_function is causal_mask_function or mask_function is bidirectional_mask_function
    tracing = torch.compiler.is_compiling() or isinstance(q_offset, torch.Tensor)
    if plain and kv_offset == 0 and not tracing:
        kv_len = _valid_prefix_lengths(attention_mask, batch_size, kv_length, device)
        if kv_len is not None:
            padded = bool((kv_len < kv_length).any())
            if mask_function is causal_mask_function:
                q_pos = (torch.arange(q_length, device=device) + int(q_offset))[None].expand(batch_size, -1)
                skip = None if padded or q_length not in (1, kv_length) else q_length > 1
            else:
                q_pos = torch.full((batch_size, q_length), kv_length - 1, dtype=torch.long, device=device)
                skip = None if padded else False
            return WindowAttnMask(kv_len=kv_len, q_pos=q_pos.contiguous(), key_slots=kv_length, sdpa_is_causal=skip)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, device=device,
                     **kwargs)


# ----------------------------------------------------------------------------- attention function
def _implicit_structure(query: torch.Tensor, key: torch.Tensor, causal: bool) -> WindowAttnMask:
    """What SDPA does with no mask: upper-left causal when `causal`, else every key."""
    batch, queries, keys = query.shape[0], query.shape[2], key.shape[2]
    kv_len = torch.full((batch,), keys, dtype=torch.long, device=query.device)
    if causal:
        q_pos = torch.arange(queries, device=query.device)[None].expand(batch, -1).contiguous()
    else:
        q_pos = torch.full((batch, queries), keys - 1, dtype=torch.long, device=query.device)
    return WindowAttnMask(kv_len=kv_len, q_pos=q_pos, key_slots=keys, sdpa_is_causal=causal)


def _op_applies(module, query, key, value, dropout: float, kwargs: dict) -> bool:
    """The op computes exactly what SDPA would: no dropout, softcap, position bias or returned
    weights; a dtype and head size it takes; GQA with whole groups; batch-aligned keys; and a
    sparrow backend runs on this device (e.g. not on MPS, nor on CUDA with neither the C++ CUDA
    kernels nor triton)."""
    if (dropout and module.training) or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        return False
    if kwargs.get("output_attentions", False):
        return False
    shapes_fit = (query.dtype in OP_DTYPES and key.dtype == query.dtype and value.dtype == query.dtype
                  and query.shape[-1] == key.shape[-1] == value.shape[-1] <= ops.MAX_HEAD_DIM
                  and key.shape[1] > 0 and query.shape[1] % key.shape[1] == 0
                  and query.shape[0] == key.shape[0] and query.shape[2] >= 1)
    return shapes_fit and _backend_runs_on(query.device)


def _backend_runs_on(device: torch.device) -> bool:
    try:
        backend.resolve(device)
    except RuntimeError:  # unavailable there (a bad backend name still raises)
        return False
    return True


def _wants_op(queries: int, keys: int) -> bool:
    route = _route.get()
    if route == "auto":
        return queries <= MAX_OP_QUERIES and keys > queries
    return route == "op"


def sparrow_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask, dropout: float = 0.0, scaling: float | None = None,
                              is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """`AttentionInterface` entry: query `[B, Hq, Tq, D]`, key/value `[B, Hkv, Tk, D]` ->
    (`[B, Tq, Hq, D]`, None). A `WindowAttnMask` (from `window_attn_mask` or passed by the
    caller) or no mask runs through `window_attn` when `_op_applies` and the route wants it;
    a dense mask, and everything else, goes to transformers' SDPA function as is."""
    if attention_mask is not None and not isinstance(attention_mask, WindowAttnMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    queries, keys = query.shape[2], key.shape[2]
    if attention_mask is None:  # e.g. the vision towers' window chunks: SDPA unless the op is wanted
        if not (_wants_op(queries, keys) and _op_applies(module, query, key, value, dropout, kwargs)):
            return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                          is_causal=is_causal, **kwargs)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        attention_mask = _implicit_structure(query, key, bool(causal) and queries > 1)
    if attention_mask.key_slots != keys or tuple(attention_mask.q_pos.shape) != (query.shape[0], queries):
        raise ValueError(f"sparrow attention: the WindowAttnMask was built for {attention_mask.key_slots} key slots "
                         f"and q_pos {list(attention_mask.q_pos.shape)}, but this layer has {keys} key slots and "
                         f"[B, Tq] = [{query.shape[0]}, {queries}] queries")
    if _wants_op(queries, keys) and _op_applies(module, query, key, value, dropout, kwargs):
        out, _ = ops.window_attn(query, key, value, attention_mask.kv_len, attention_mask.q_pos, 0, 0,
                                 attention_mask.tree_mask, 0.0 if scaling is None else float(scaling))
        return out.transpose(1, 2).contiguous(), None  # [B, Tq, Hq, D]
    if attention_mask.sdpa_is_causal is not None:
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                      is_causal=attention_mask.sdpa_is_causal, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask.dense(keys), dropout=dropout,
                                  scaling=scaling, is_causal=False, **kwargs)


def register() -> None:
    """Make `attn_implementation="sparrow"` available to every transformers model (idempotent)."""
    AttentionInterface.register(NAME, sparrow_attention_forward)
    AttentionMaskInterface.register(NAME, window_attn_mask)


register()
