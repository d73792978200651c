"""gather_hidden on every backend against the reference (exact: it only moves values), and
the reference against per-element indexing."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparrow_kernels import ops
from sparrow_kernels.ops import reference
from tests.ops.helpers import poisoned_outputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def gather_cases(draw, small=False):
    n_layers = draw(st.integers(1, 6))  # > 4 too: some kernels take layers in groups
    B = draw(st.integers(1, 2 if small else 3))
    T = draw(st.integers(1, 9 if small else 20))
    H = draw(st.sampled_from((1, 8, 24, 40) if small else (1, 8, 24, 40, 96, 136)))
    N = draw(st.integers(0, 8 if small else 16))
    strided = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return n_layers, B, T, H, N, strided, seed


def make_gather_inputs(case, dtype, device):
    """Hidden states (optionally the first T rows of longer buffers, so rows are strided) and
    an index mixing valid rows, repeats and -1 padding."""
    n_layers, B, T, H, N, strided, seed = case
    gen = torch.Generator().manual_seed(seed)
    hidden = []
    for _ in range(n_layers):
        h = torch.randn(B, T + (3 if strided else 0), H, generator=gen).to(device, dtype)  # [B, T(+3), H]
        hidden.append(h[:, :T])
    index = torch.randint(-1, T, (B, N), generator=gen).to(device)                          # [B, N]
    return hidden, index


def test_reference_matches_elementwise_definition():
    hidden, index = make_gather_inputs((3, 2, 5, 4, 7, True, 0), torch.float32, "cpu")
    out = reference.gather_hidden(hidden, index)
    for b in range(2):
        for n in range(7):
            for layer in range(3):
                expected = torch.zeros(4) if index[b, n] == -1 else hidden[layer][b, index[b, n]]
                assert torch.equal(out[b, n, layer * 4:(layer + 1) * 4], expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_gather_hidden_matches_reference(backend, dtype):
    @settings(max_examples=backend.examples(40), database=None)
    @given(case=gather_cases(small=backend.interpreted))
    def check(case):
        hidden, index = make_gather_inputs(case, dtype, backend.device)
        expected = reference.gather_hidden(hidden, index)
        with poisoned_outputs(backend.device), backend.use():
            out = ops.gather_hidden(hidden, index)
        assert out.shape == expected.shape and out.dtype == dtype and out.device == index.device
        assert torch.equal(out, expected), f"max diff {(out.float() - expected.float()).abs().max()}"

    check()


def test_gather_hidden_padding_is_zero_even_over_nan_rows(backend):
    """-1 yields zeros without reading any row: rows full of NaN do not leak."""
    hidden = [torch.full((2, 4, 8), float("nan"), device=backend.device) for _ in range(2)]
    hidden[1][:, 2] = 5.0
    index = torch.tensor([[-1, 2, -1], [2, -1, -1]], device=backend.device)
    with poisoned_outputs(backend.device), backend.use():
        out = ops.gather_hidden(hidden, index)
    padding = (index == -1)[:, :, None].expand(-1, -1, 16)
    assert torch.all(out[padding] == 0)
    assert torch.all(out[:, :, 8:][index != -1] == 5.0)
