"""Triton kernel for `kv_compact`: in place, move each row's accepted draft-tree slots to the
slots right after its committed prefix, for every layer of a stacked KV cache in one launch.

One program per (layer, row, head) walks i = 0, 1, ... in order (layer/row/head reached by
stride arithmetic; no pointer tables), so overlapping source/destination ranges are safe.
It never touches slots below prefix_len[b] nor outside [0, S) for any index value (ranges are
tested without forming overflowing sums); validation is the ops front's job.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv, next_pow2

# element size -> a dtype of that size every Triton version loads and stores
_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _kv_compact_kernel(kv_ptr, prefix_len_ptr, accept_index_ptr, accept_len_ptr,
                       B, H, S, D, A, stride_ab,
                       BLOCK_D: tl.constexpr):
    """Program (layer * B * H + b * H + h, column block): for i < accept_len[b], in order,
    kv[l, b, h, prefix + i] = kv[l, b, h, prefix + accept_index[b, i]] (skipped when equal).
    Each column is copied by the same lanes at every i, so the in-order walk is race free:
    destination prefix + i is never the source of a later step (accept_index[b, j] >= j)."""
    pid = tl.program_id(0)
    pid_col = tl.program_id(1)
    h = pid % H
    b = (pid // H) % B
    layer = pid // (H * B)
    b64 = b.to(tl.int64)
    prefix = tl.load(prefix_len_ptr + b)
    n_accept = tl.maximum(tl.minimum(tl.load(accept_len_ptr + b), A), 0).to(tl.int32)
    plane = kv_ptr + ((layer.to(tl.int64) * B + b64) * H + h) * S * D     # kv[l, b, h]
    cols = pid_col * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    for i in range(0, n_accept):
        node = tl.load(accept_index_ptr + b64 * stride_ab + i)
        # in range without forming an overflowing sum: 0 <= prefix <= S, node < S - prefix, i < S - prefix
        room = S - tl.minimum(tl.maximum(prefix, 0), S)
        move = (node != i) & (node >= 0) & (prefix >= 0) & (node < room) & (i < room)
        src = tl.where(move, prefix + node, 0)
        dst = tl.where(move, prefix + i, 0)
        row = tl.load(plane + src * D + cols, mask=col_ok & move)
        tl.store(plane + dst * D + cols, row, mask=col_ok & move)


def kv_compact(kv: torch.Tensor, prefix_len: torch.Tensor, accept_index: torch.Tensor,
               accept_len: torch.Tensor) -> None:
    """In place on kv [L, B, H, S, D] (contiguous): for every l, h and i < accept_len[b], in
    increasing i, kv[l, b, h, prefix_len[b] + i] = kv[l, b, h, prefix_len[b] + accept_index[b, i]]."""
    if kv.dim() != 5:
        raise ValueError(f"kv_compact (triton): kv must have shape [L, B, H, S, D], got {list(kv.shape)}")
    if not kv.is_contiguous():
        raise ValueError("kv_compact (triton): kv must be contiguous (it is updated in place)")
    L, B, H, S, D = kv.shape
    if tuple(prefix_len.shape) != (B,) or tuple(accept_len.shape) != (B,) or accept_index.dim() != 2 \
            or accept_index.shape[0] != B:
        raise ValueError(f"kv_compact (triton): prefix_len and accept_len must have shape [{B}] and "
                         f"accept_index [{B}, A], got {list(prefix_len.shape)}, {list(accept_len.shape)}, "
                         f"{list(accept_index.shape)}")
    if kv.numel() == 0 or accept_index.shape[1] == 0:
        return
    element = _SAME_SIZE_INT.get(kv.element_size())
    if element is None:
        raise ValueError(f"kv_compact (triton): unsupported element size {kv.element_size()} ({kv.dtype})")
    kv_bits = kv.view(element)                                     # same bytes, integer view
    accept_index = accept_index if accept_index.stride(-1) == 1 else accept_index.contiguous()
    prefix_len, accept_len = prefix_len.contiguous(), accept_len.contiguous()
    block_d = min(next_pow2(D), 1024)
    grid = (L * B * H, cdiv(D, block_d))
    _kv_compact_kernel[grid](kv_bits, prefix_len, accept_index, accept_len,
                             B, H, S, D, accept_index.shape[1], accept_index.stride(0),
                             BLOCK_D=block_d, num_warps=1 if block_d <= 128 else 4)
