"""Silent wrong answers (issue 17): NaN in what a query sees must come out as NaN and what it
cannot see must not matter, on every backend; value checks on probabilities, coins and
scale; the reference's gather_hidden for T = 0; the dtypes each backend refuses."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparrow_kernels import ops
from sparrow_kernels.ops import reference
from tests.ops.helpers import ancestor_mask

# (label, B, Hq, Hkv, Tq, Tk, D, window, n_anchor, tree): the last one sends fp32 on the
# C++ CPU backend through csrc/window_attn_shared.cpp (>= 128 keys every query sees)
CONFIGS = [
    ("window+anchor", 2, 4, 2, 3, 24, 16, 6, 2, False),
    ("tree", 2, 2, 1, 4, 20, 8, 5, 1, True),
    ("shared keys", 1, 2, 1, 3, 300, 16, 0, 0, False),
]


def attn_inputs(config, device, seed=0):
    _, B, Hq, Hkv, Tq, Tk, D, window, n_anchor, tree = config
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=gen)
    k = torch.randn(B, Hkv, Tk, D, generator=gen)
    v = torch.randn(B, Hkv, Tk, D, generator=gen)
    kv_len = torch.tensor([Tk - 3 * b for b in range(B)])                   # slots past kv_len exist
    q_pos = (kv_len[:, None] - Tq + torch.arange(Tq)).contiguous()
    tree_mask = None
    if tree:
        tree_mask = ancestor_mask([-1, 0, 0, 1][:Tq]).expand(B, Tq, Tq).contiguous()
    x = dict(q=q, k=k, v=v, kv_len=kv_len, q_pos=q_pos, window=window, n_anchor=n_anchor, tree_mask=tree_mask,
             scale=0.0)
    return {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in x.items()}


def sees(x, Hq, Hkv):
    """bool [B, Hq, Tq, Tk]: query row (b, h, i) sees key slot j (the contract's rule)."""
    vis = reference.window_visibility(x["kv_len"].cpu(), x["q_pos"].cpu(), x["k"].shape[2], x["window"],
                                      x["n_anchor"], None if x["tree_mask"] is None else x["tree_mask"].cpu())
    return vis[:, None].expand(-1, Hq, -1, -1)


@st.composite
def poison(draw, config):
    _, B, Hq, Hkv, Tq, Tk, D, *_ = config
    tensor = draw(st.sampled_from(["q", "k", "v"]))
    b = draw(st.integers(0, B - 1))
    h = draw(st.integers(0, (Hq if tensor == "q" else Hkv) - 1))
    t = draw(st.integers(0, (Tq if tensor == "q" else Tk) - 1))
    d = draw(st.integers(0, D - 1))
    return tensor, (b, h, t, d)


def check_nan_propagation(backend, config, where):
    tensor, (b, h, t, d) = where
    _, B, Hq, Hkv, *_ = config
    x = attn_inputs(config, backend.device)
    with backend.use():
        clean_out, clean_lse = ops.window_attn(**x)
        x[tensor] = x[tensor].clone()
        x[tensor][b, h, t, d] = float("nan")
        out, lse = ops.window_attn(**x)
    out, lse, clean_out, clean_lse = out.cpu(), lse.cpu(), clean_out.cpu(), clean_lse.cpu()
    visible = sees(x, Hq, Hkv)                                              # [B, Hq, Tq, Tk]
    hit = torch.zeros(lse.shape, dtype=torch.bool)                          # rows that must be NaN
    group = Hq // Hkv
    if tensor == "q":
        hit[b, h, t] = bool(visible[b, h, t].any())
    else:
        heads = slice(h * group, (h + 1) * group)
        hit[b, heads] = visible[b, heads, :, t]
    if tensor == "v":   # lse does not depend on v; out is NaN in column d (at least)
        assert torch.isnan(out[..., d][hit]).all(), f"{where}: a visible NaN value did not reach out"
        torch.testing.assert_close(lse, clean_lse, equal_nan=True)
    else:
        assert torch.isnan(lse[hit]).all(), f"{where}: NaN did not reach lse of the rows that see it"
        assert torch.isnan(out[hit]).all(), f"{where}: NaN did not reach out of the rows that see it"
        torch.testing.assert_close(lse[~hit], clean_lse[~hit])
    # rows that cannot see the NaN are unchanged, bit for bit on the same backend
    assert not torch.isnan(out[~hit]).any(), f"{where}: NaN spread to rows that cannot see it"
    torch.testing.assert_close(out[~hit], clean_out[~hit], rtol=0, atol=0)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c[0])
def test_window_attn_nan_reaches_exactly_the_rows_that_see_it(any_backend, config):
    @settings(max_examples=any_backend.examples(40), database=None)
    @given(where=poison(config))
    def check(where):
        check_nan_propagation(any_backend, config, where)

    check()


@pytest.mark.parametrize("where", [("q", (0, 1, 2, 3)), ("k", (0, 0, 23, 0)), ("v", (1, 1, 10, 5)),
                                   ("k", (1, 0, 22, 1)), ("v", (0, 0, 0, 0))], ids=str)
def test_window_attn_nan_known_cases(any_backend, where):
    """q NaN (was out = 0, lse = -inf on the CPU); a visible key; a NaN past kv_len[1] = 21
    (slot 22); an anchor's value."""
    check_nan_propagation(any_backend, CONFIGS[0], where)


def test_window_attn_invisible_nan_value_in_a_shared_block(any_backend):
    """A NaN value of a key that one query sees and its neighbour does not (same key block):
    P @ V with probability 0 must not spread it (0 * NaN) to the neighbour."""
    config = ("window 1", 1, 1, 1, 2, 8, 16, 1, 0, False)
    x = attn_inputs(config, any_backend.device)
    x["v"][0, 0, 6, 0] = float("nan")          # q_pos = [6, 7], window 1: only query 0 sees slot 6
    with any_backend.use():
        out, _ = ops.window_attn(**x)
    out = out.cpu()
    assert torch.isnan(out[0, 0, 0]).any() and not torch.isnan(out[0, 0, 1]).any()


@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan])
def test_non_finite_scale_is_rejected(any_backend, scale):
    x = attn_inputs(CONFIGS[0], any_backend.device)
    x["scale"] = scale
    with any_backend.use(), pytest.raises((RuntimeError, ValueError), match=r"window_attn: scale must be finite"):
        ops.window_attn(**x)


# ----------------------------------------------------------------------------- tree_verify_sample values
def sample_inputs(V=6):
    gen = torch.Generator().manual_seed(1)
    return dict(candidates=torch.tensor([[0, 1, 2, 3]]), target_probs=torch.softmax(torch.randn(1, 4, V, generator=gen), -1),
                draft_probs=torch.softmax(torch.randn(1, 4, V, generator=gen), -1),
                next_token=torch.tensor([[1, 3, -1, -1]]), next_sibling=torch.tensor([[-1, 2, -1, -1]]),
                uniform_accept=torch.full((1, 4), 0.5), uniform_final=torch.tensor([0.25]))


BAD_VALUES = [("target_probs", (0, 2, 1), math.nan, "finite and >= 0"),
              ("target_probs", (0, 0, 3), math.inf, "finite and >= 0"),
              ("target_probs", (0, 1, 0), -0.25, "finite and >= 0"),
              ("draft_probs", (0, 0, 2), math.nan, "finite and >= 0"),
              ("draft_probs", (0, 3, 5), -1e-30, "finite and >= 0"),
              ("uniform_accept", (0, 2), 1.0, r"in \[0, 1\)"),
              ("uniform_accept", (0, 1), -0.5, r"in \[0, 1\)"),
              ("uniform_accept", (0, 3), math.nan, r"in \[0, 1\)"),
              ("uniform_final", (0,), 1.5, r"in \[0, 1\)"),
              ("uniform_final", (0,), math.nan, r"in \[0, 1\)")]


@pytest.mark.parametrize("arg,where,value,expected", BAD_VALUES, ids=lambda v: str(v))
def test_tree_verify_sample_rejects_bad_probabilities_and_coins(any_backend, arg, where, value, expected):
    if any_backend.device.type != "cpu":
        pytest.skip("value checks read tensor data: done on the host for CPU tensors only")
    x = {n: t.to(any_backend.device) for n, t in sample_inputs().items()}
    x[arg][where] = value
    index = ", ".join(str(i) for i in where)
    with any_backend.use(), pytest.raises((RuntimeError, ValueError),
                                          match=rf"tree_verify_sample: {arg} values must be {expected}, "
                                                rf"got {arg}\[{index}\] = ") as err:
        ops.tree_verify_sample(**x)
    assert "all-zero" not in str(err.value)


def test_tree_verify_sample_all_zero_target_row_raises(any_backend):
    """Node 0's children are all rejected (coins ~1) and its target row has no mass left:
    every backend raises the same error (the reference hit an IndexError)."""
    if any_backend.device.type != "cpu":
        pytest.skip("CUDA kernels cannot raise: they return bonus_token = -1 (docs/ops.md)")
    x = sample_inputs()
    x["target_probs"][0, 0] = 0.0
    x["uniform_accept"][:] = 0.999
    x = {n: t.to(any_backend.device) for n, t in x.items()}
    with any_backend.use(), pytest.raises((RuntimeError, ValueError),
                                          match=r"target_probs\[0, 0\] must have positive mass .* all-zero row"):
        ops.tree_verify_sample(**x)


# ----------------------------------------------------------------------------- gather_hidden T = 0, dtypes
def test_reference_gather_hidden_with_no_tokens_gives_zeros():
    hidden = [torch.randn(2, 0, 8), torch.randn(2, 0, 8)]
    index = torch.full((2, 3), -1)
    expected = torch.ops.sparrow.gather_hidden(hidden, index)
    out = reference.gather_hidden(hidden, index)
    assert out.shape == (2, 3, 16) and torch.equal(out, expected) and not out.any()


@pytest.mark.parametrize("name", ["reference", "cpu"])
def test_window_attn_float64_gives_float64_lse(name):
    x = attn_inputs(CONFIGS[0], "cpu")
    x.update(q=x["q"].double(), k=x["k"].double(), v=x["v"].double())
    import sparrow_kernels
    with sparrow_kernels.use_backend(name):
        out, lse = ops.window_attn(**x)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64


def test_triton_refuses_what_it_cannot_compute(backend):
    """float64 (no Triton kernel) and, in the interpreter, bf16 (wrong dots: lse ~4e9 for
    this 4-key row) are refused with an error, not answered."""
    if backend.name != "triton":
        pytest.skip("the Triton backend's refusals")
    dev = backend.device
    q, k = torch.randn(1, 1, 1, 16, device=dev), torch.randn(1, 1, 4, 16, device=dev)
    args = (torch.tensor([4], device=dev), torch.tensor([[3]], device=dev), 0, 0, None, 0.0)
    with backend.use(), pytest.raises(ValueError, match=r"window_attn: backend 'triton' computes float32/float16/"):
        ops.window_attn(q.double(), k.double(), k.double(), *args)
    if backend.interpreted:
        with backend.use(), pytest.raises(ValueError, match=r"window_attn: backend 'triton' cannot compute bfloat16"):
            ops.window_attn(q.bfloat16(), k.bfloat16(), k.bfloat16(), *args)
