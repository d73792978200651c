"""Triton kernel for `gather_hidden`: rows of several layers' hidden states gathered at
per-row indices and concatenated along the feature axis, in one launch for up to 4 layers.

Layers are passed as separate pointer arguments (no pointer table, which the interpreter
cannot run); more than 4 layers take one launch per group of 4. No validation beyond
what keeps the kernel in bounds (the ops front checks inputs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv, next_pow2

LAYERS_PER_LAUNCH = 4


@triton.jit
def _copy_layer(src_ptr, stride_b, stride_t, b64, token, present, out_row_ptr, col_offset, cols, col_ok):
    values = tl.load(src_ptr + b64 * stride_b + token * stride_t + cols, mask=col_ok & present, other=0)
    tl.store(out_row_ptr + col_offset + cols, values, mask=col_ok)


@triton.jit
def _gather_hidden_kernel(
        h0_ptr, h1_ptr, h2_ptr, h3_ptr, index_ptr, out_ptr,
        s0_b, s0_t, s1_b, s1_t, s2_b, s2_t, s3_b, s3_t,
        stride_ib, stride_ob, stride_on,
        N, T, H, first_layer,
        N_LAYERS: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program (row b * N + n, column block): out[b, n, (first_layer + l) * H + cols] =
    hidden_l[b, index[b, n], cols] for l < N_LAYERS, zeros where index == -1."""
    pid_row = tl.program_id(0)
    pid_col = tl.program_id(1)
    b64 = (pid_row // N).to(tl.int64)
    n = pid_row % N
    token = tl.load(index_ptr + b64 * stride_ib + n)
    present = (token >= 0) & (token < T)
    token = tl.where(present, token, 0).to(tl.int64)
    cols = pid_col * BLOCK_H + tl.arange(0, BLOCK_H)               # [BLOCK_H]
    col_ok = cols < H
    out_row_ptr = out_ptr + b64 * stride_ob + n.to(tl.int64) * stride_on
    base = first_layer * H
    _copy_layer(h0_ptr, s0_b, s0_t, b64, token, present, out_row_ptr, base, cols, col_ok)
    if N_LAYERS > 1:
        _copy_layer(h1_ptr, s1_b, s1_t, b64, token, present, out_row_ptr, base + H, cols, col_ok)
    if N_LAYERS > 2:
        _copy_layer(h2_ptr, s2_b, s2_t, b64, token, present, out_row_ptr, base + 2 * H, cols, col_ok)
    if N_LAYERS > 3:
        _copy_layer(h3_ptr, s3_b, s3_t, b64, token, present, out_row_ptr, base + 3 * H, cols, col_ok)


def _as_kernel_dtype(t: torch.Tensor) -> torch.Tensor:
    """Same bytes as a dtype every Triton version loads (bool and fp8 as integers)."""
    if t.dtype == torch.bool or (t.dtype.is_floating_point and t.dtype.itemsize == 1):
        return t.view(torch.uint8)
    return t


def gather_hidden(hidden: list[torch.Tensor] | tuple[torch.Tensor, ...], index: torch.Tensor) -> torch.Tensor:
    """out [B, N, n_layers * H] with out[b, n, l*H:(l+1)*H] = hidden[l][b, index[b, n]], zeros
    where index[b, n] == -1. hidden: n_layers x [B, T, H] (last dim contiguous); index [B, N]."""
    if len(hidden) == 0:
        raise ValueError("gather_hidden (triton): hidden must hold at least one [B, T, H] tensor")
    first = hidden[0]
    if first.dim() != 3 or index.dim() != 2 or index.shape[0] != first.shape[0]:
        raise ValueError(f"gather_hidden (triton): hidden[l] must be [B, T, H] and index [B, N], got "
                         f"{list(first.shape)} and {list(index.shape)}")
    for layer, h in enumerate(hidden):
        if h.shape != first.shape or h.dtype != first.dtype or h.device != first.device:
            raise ValueError(f"gather_hidden (triton): hidden[{layer}] must match hidden[0] "
                             f"({list(first.shape)}, {first.dtype}, {first.device}), got "
                             f"{list(h.shape)}, {h.dtype}, {h.device}")
    if index.device != first.device:
        raise ValueError(f"gather_hidden (triton): index must be on {first.device}, got {index.device}")
    B, T, H = first.shape
    N = index.shape[1]
    n_layers = len(hidden)
    out = torch.empty((B, N, n_layers * H), dtype=first.dtype, device=first.device)  # [B, N, n_layers * H]
    if out.numel() == 0:
        return out
    layers = [_as_kernel_dtype(h if h.stride(-1) == 1 else h.contiguous()) for h in hidden]
    out_view = _as_kernel_dtype(out)
    index = index if index.stride(-1) == 1 else index.contiguous()
    block_h = min(next_pow2(H), 1024)
    grid = (B * N, cdiv(H, block_h))
    for first_layer in range(0, n_layers, LAYERS_PER_LAUNCH):
        group = layers[first_layer:first_layer + LAYERS_PER_LAUNCH]
        padded = group + [group[0]] * (LAYERS_PER_LAUNCH - len(group))   # unused slots never read
        strides = [s for h in padded for s in (h.stride(0), h.stride(1))]
        _gather_hidden_kernel[grid](
            *padded, index, out_view, *strides,
            index.stride(0), out_view.stride(0), out_view.stride(1),
            N, T, H, first_layer,
            N_LAYERS=len(group), BLOCK_H=block_h, num_warps=4 if block_h >= 512 else 2)
    return out
