"""kv_compact on every backend against the reference: rows with different accept lengths,
overlapping source/destination slots, all layers at once; the committed prefix and other
rows' slots never change, and NaN past the tree never reaches the kept range."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparrow_kernels import ops
from sparrow_kernels.ops import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def compact_cases(draw, small=False):
    L = draw(st.integers(1, 3 if small else 4))
    B = draw(st.integers(1, 3 if small else 4))
    H = draw(st.integers(1, 2 if small else 3))
    D = draw(st.sampled_from((1, 8, 24) if small else (1, 8, 24, 64, 128)))
    S = draw(st.integers(1, 12 if small else 40))
    rows = []
    for _ in range(B):
        prefix = draw(st.integers(0, S - 1))
        n_nodes = draw(st.integers(1, S - prefix))      # the tree occupies slots prefix .. prefix + n_nodes - 1
        kept = sorted(draw(st.sets(st.integers(0, n_nodes - 1), max_size=n_nodes)))
        rows.append((prefix, n_nodes, kept))
    A = draw(st.integers(max(len(k) for _, _, k in rows), max(len(k) for _, _, k in rows) + 2))
    return L, B, H, S, D, A, rows, draw(st.integers(0, 2**31 - 1))


def make_compact_inputs(case, dtype, device):
    """kv with random values in the prefix and tree slots and NaN past each row's tree."""
    L, B, H, S, D, A, rows, seed = case
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(L, B, H, S, D, generator=gen)                              # [L, B, H, S, D]
    prefix_len = torch.tensor([p for p, _, _ in rows], dtype=torch.int64)       # [B]
    accept_index = torch.full((B, A), -1, dtype=torch.int64)                    # [B, A]
    accept_len = torch.tensor([len(k) for _, _, k in rows], dtype=torch.int64)  # [B]
    for b, (prefix, n_nodes, kept) in enumerate(rows):
        kv[:, b, :, prefix + n_nodes:] = float("nan")
        accept_index[b, :len(kept)] = torch.tensor(kept, dtype=torch.int64)
    return kv.to(device, dtype), prefix_len.to(device), accept_index.to(device), accept_len.to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_kv_compact_matches_reference(backend, dtype):
    @settings(max_examples=backend.examples(50), database=None)
    @given(case=compact_cases(small=backend.interpreted))
    def check(case):
        kv, prefix_len, accept_index, accept_len = make_compact_inputs(case, dtype, backend.device)
        before = kv.clone()
        expected = kv.cpu().clone()
        reference.kv_compact(expected, prefix_len.cpu(), accept_index.cpu(), accept_len.cpu())
        data_ptr = kv.data_ptr()
        with backend.use():
            result = ops.kv_compact(kv, prefix_len, accept_index, accept_len)
        assert result is None and kv.data_ptr() == data_ptr, "kv_compact works in place and returns None"
        kv = kv.cpu()
        for b in range(case[1]):
            prefix, n_keep = int(prefix_len[b]), int(accept_len[b])
            # the committed prefix is untouched, and the kept range equals the reference
            assert torch.equal(kv[:, b, :, :prefix], before[:, b, :, :prefix].cpu()), f"row {b}: prefix changed"
            kept = slice(prefix, prefix + n_keep)
            assert torch.equal(kv[:, b, :, kept], expected[:, b, :, kept]), f"row {b}: kept slots differ"

    check()


def test_kv_compact_overlapping_hand_case(backend):
    """Row 0 keeps nodes [0, 1, 3, 4] (sources overlap destinations: slot 3 is read before
    being overwritten), row 1 keeps [2, 5] (nothing kept in place), row 2 keeps nothing."""
    L, B, H, S, D = 2, 3, 1, 9, 2
    slot = torch.arange(S, dtype=torch.float32)
    kv = slot[None, None, None, :, None].expand(L, B, H, S, D).contiguous()           # kv[..., s, :] = s
    kv = kv + 100 * torch.arange(B, dtype=torch.float32)[None, :, None, None, None]    # + 100 * row
    kv = kv.to(backend.device)
    prefix_len = torch.tensor([2, 1, 3], device=backend.device)
    accept_index = torch.tensor([[0, 1, 3, 4], [2, 5, -1, -1], [-1, -1, -1, -1]], device=backend.device)
    accept_len = torch.tensor([4, 2, 0], device=backend.device)
    with backend.use():
        ops.kv_compact(kv, prefix_len, accept_index, accept_len)
    row0 = kv[0, 0, 0, :, 0].tolist()
    row1 = kv[1, 1, 0, :, 0].tolist()
    assert row0[:6] == [0, 1, 2, 3, 5, 6], row0                  # prefix 0..1, then slots 2, 3, 5, 6
    assert row1[:3] == [100, 103, 106], row1                     # prefix 0, then slots 3, 6
    assert kv[:, 2].tolist() == (torch.arange(S) + 200.0)[None, None, :, None].expand(L, H, S, D).tolist()
