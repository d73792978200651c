"""Triton-specific tests of kv_compact: every layer in one launch, element sizes 1/2/4/8
bytes (bit copies through an integer view), head dims spanning several column blocks, and
a source slot that a later step overwrites (the in-order walk must read it first)."""
from __future__ import annotations


import pytest
import torch

from sparrow_kernels.ops import reference

from tests.triton.helpers import CUDA_MARKS, DEVICE, HAS_CUDA  # noqa: E402  (skips without GPU/interpreter)

pytestmark = CUDA_MARKS

from sparrow_kernels import triton_ops  # noqa: E402  (after the interpreter switch)


def random_cache(shape, dtype, gen):
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if not dtype.is_floating_point:
        return torch.randint(-100, 100, shape, generator=gen, dtype=dtype)
    return torch.randn(shape, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.float16, torch.bfloat16, torch.float32,
                                   torch.int64], ids=lambda d: str(d).replace("torch.", ""))
def test_kv_compact_all_layers_any_element_size(dtype):
    gen = torch.Generator().manual_seed(7)
    L, B, H, S, D = 6, 3, 2, 16, 24
    kv = random_cache((L, B, H, S, D), dtype, gen)                  # [L, B, H, S, D]
    prefix_len = torch.tensor([3, 0, 9])
    # row 0: a path with gaps; row 1: nothing accepted; row 2: a path through the whole tree
    accept_index = torch.tensor([[0, 2, 3, 6, -1], [-1, -1, -1, -1, -1], [0, 1, 2, 4, 6]])
    accept_len = torch.tensor([4, 0, 5])
    expected = kv.clone()
    reference.kv_compact(expected, prefix_len, accept_index, accept_len)
    got = kv.clone().to(DEVICE)                                     # kv itself stays the original
    triton_ops.kv_compact(got, prefix_len.to(DEVICE), accept_index.to(DEVICE), accept_len.to(DEVICE))
    got = got.cpu()
    assert torch.equal(got, expected)
    assert torch.equal(got[:, 1], kv[:, 1])                        # a row with accept_len 0 is untouched
    assert torch.equal(got[:, 0, :, :3], kv[:, 0, :, :3])          # the committed prefix is untouched


def test_kv_compact_reads_a_source_before_a_later_step_overwrites_it_across_column_blocks():
    """accept_index [0, 2, 3, 5]: step 1 reads slot p+2 that step 2 overwrites, step 2 reads
    slot p+3 that step 3 overwrites. D = 1100 spans two column programs per (layer, row, head)."""
    gen = torch.Generator().manual_seed(8)
    L, B, H, S, D = 2, 2, 1, 12, 1100
    kv = torch.randn(L, B, H, S, D, generator=gen)
    prefix_len = torch.tensor([2, 5])
    accept_index = torch.tensor([[0, 2, 3, 5], [0, 1, 2, 3]])
    accept_len = torch.tensor([4, 4])
    got = kv.clone().to(DEVICE)                                     # kv itself stays the original
    triton_ops.kv_compact(got, prefix_len.to(DEVICE), accept_index.to(DEVICE), accept_len.to(DEVICE))
    got = got.cpu()
    for i, node in enumerate([0, 2, 3, 5]):
        assert torch.equal(got[:, 0, :, 2 + i], kv[:, 0, :, 2 + node]), f"row 0 slot {2 + i}"
    assert torch.equal(got[:, 1], kv[:, 1])                        # identity path: nothing moves
    assert torch.equal(got[:, 0, :, 6:], kv[:, 0, :, 6:])          # slots past the kept range keep their data


def test_kv_compact_rejects_non_contiguous_cache():
    kv = torch.zeros(2, 2, 1, 8, 4, device=DEVICE).transpose(3, 4)
    with pytest.raises(ValueError, match="kv must"):
        triton_ops.kv_compact(kv, torch.zeros(2, dtype=torch.int64, device=DEVICE),
                              torch.zeros(2, 1, dtype=torch.int64, device=DEVICE),
                              torch.zeros(2, dtype=torch.int64, device=DEVICE))
