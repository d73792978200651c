"""Triton-specific tests of gather_hidden: one launch per group of 4 layers (1..9 layers),
hidden sizes spanning several column blocks, layers given as strided views, padding -1.
Exact equality with the reference (a gather is a copy)."""
from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparrow_kernels.ops import reference
from tests.ops.helpers import poison_allocator

from tests.triton.helpers import CUDA_MARKS, DEVICE, HAS_CUDA  # noqa: E402  (skips without GPU/interpreter)

pytestmark = CUDA_MARKS

from sparrow_kernels import triton_ops  # noqa: E402  (after the interpreter switch)


def strided_layer(values: torch.Tensor, how: str) -> torch.Tensor:
    """The same values [B, T, H] in a layout whose last dim alone is contiguous."""
    B, T, H = values.shape
    if how == "slice":      # the first T positions of a longer sequence buffer
        buffer = torch.full((B, T + 3, H), float("nan"), dtype=values.dtype, device=values.device)
        buffer[:, :T] = values
        return buffer[:, :T]
    if how == "time_major":  # storage [T, B, H]
        return values.transpose(0, 1).contiguous().transpose(0, 1)
    return values


@settings(max_examples=12 if not HAS_CUDA else 60, deadline=None)
@given(n_layers=st.integers(1, 9), B=st.integers(1, 3), T=st.integers(1, 9), N=st.integers(1, 6),
       H=st.sampled_from([1, 7, 64, 1030]), layout=st.sampled_from(["contiguous", "slice", "time_major"]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2**20))
def test_gather_hidden_equals_reference(n_layers, B, T, N, H, layout, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(B, T, H, generator=gen).to(DEVICE, dtype) for _ in range(n_layers)]   # [B, T, H] each
    hidden = [strided_layer(h, layout if i % 2 == 0 else "contiguous") for i, h in enumerate(hidden)]
    index = torch.randint(-1, T, (B, N), generator=gen)                                         # [B, N]
    index[0, 0] = -1                                                                             # always some padding
    poison_allocator(DEVICE)
    out = triton_ops.gather_hidden(hidden, index.to(DEVICE))
    expected = reference.gather_hidden([h.cpu() for h in hidden], index)
    assert out.shape == (B, N, n_layers * H) and out.dtype == dtype
    assert torch.equal(out.cpu(), expected)
    assert torch.all(out[0, 0] == 0)


def test_gather_hidden_padding_over_nan_rows_is_zero_and_layers_stay_in_order():
    B, T, H = 2, 5, 48
    hidden = [torch.full((B, T, H), float(layer), device=DEVICE) for layer in range(6)]
    hidden[2][:, 1] = float("nan")                 # only position 1 of layer 2 is NaN, never gathered
    index = torch.tensor([[0, -1, 4], [-1, 3, 2]], device=DEVICE)
    out = triton_ops.gather_hidden(hidden, index).cpu()
    for layer in range(6):
        block = out[:, :, layer * H:(layer + 1) * H]
        assert torch.all(block[index.cpu() >= 0] == layer)
        assert torch.all(block[index.cpu() < 0] == 0)
