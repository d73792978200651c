"""window_attn (forward and backward) on every backend against the reference, and the
reference itself against an independent formulation (a rule-by-rule mask + SDPA).
Backend-specific paths (split-KV decode, block skipping) are tested in tests/<backend>/.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparrow_kernels import ops
from sparrow_kernels.ops import reference
from tests.ops.helpers import (LOW_PRECISION, WindowCase, assert_close_fp32, assert_within_low_precision_error,
                               branch, depths, make_window_inputs, poisoned_outputs, slots_of_larger_cache,
                               window_attn_low_precision, window_cases)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def case_limits(backend) -> dict:
    """Shapes for hypothesis: tiny ones for the Triton interpreter."""
    if backend.interpreted:
        return dict(max_batch=2, max_kv_heads=2, max_group=3, head_dims=(16, 24, 32), max_tq=5, max_extra_keys=8)
    return {}


# ----------------------------------------------------------------------------- the reference is right
def visibility_by_rule(kv_len, q_pos, Tk, window, n_anchor, tree_mask):
    """docs/ops.md's visibility rule, literally, one (b, i, j) at a time."""
    B, Tq = q_pos.shape
    visible = torch.zeros(B, Tq, Tk, dtype=torch.bool)
    for b in range(B):
        n = int(kv_len[b])
        for i in range(Tq):
            p = int(q_pos[b, i])
            for j in range(n):
                if tree_mask is not None and j >= n - Tq:
                    visible[b, i, j] = bool(tree_mask[b, i, j - (n - Tq)])
                else:
                    visible[b, i, j] = j <= p and (window <= 0 or j >= p - window + 1 or j < n_anchor)
    return visible


@settings(max_examples=60)
@given(case=window_cases(head_dims=(8,)))
def test_reference_visibility_follows_the_rule(case: WindowCase):
    x = make_window_inputs(case, torch.float32, "cpu")
    got = reference.window_visibility(x.kv_len, x.q_pos, case.Tk, x.window, x.n_anchor, x.tree_mask)
    assert torch.equal(got, visibility_by_rule(x.kv_len, x.q_pos, case.Tk, x.window, x.n_anchor, x.tree_mask))


@settings(max_examples=40)
@given(case=window_cases(head_dims=(8, 16)))
def test_reference_matches_sdpa_with_an_explicit_mask(case: WindowCase):
    x = make_window_inputs(case, torch.float64, "cpu")
    out, lse = reference.window_attn(*x.args())
    visible = visibility_by_rule(x.kv_len, x.q_pos, case.Tk, x.window, x.n_anchor, x.tree_mask)  # [B, Tq, Tk]
    visible = visible[:, None]                                                                     # [B, 1, Tq, Tk]
    keys = torch.nan_to_num(x.k).repeat_interleave(case.group, 1)                   # [B, Hq, Tk, D]
    values = torch.nan_to_num(x.v).repeat_interleave(case.group, 1)
    scale = x.scale if x.scale > 0 else 1 / math.sqrt(case.D)
    sdpa = F.scaled_dot_product_attention(x.q, keys, values, attn_mask=visible, scale=scale)
    scores = (x.q @ keys.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    has_key = visible.any(-1).expand(-1, case.Hq, -1)                               # [B, Hq, Tq]
    torch.testing.assert_close(out[has_key], sdpa[has_key])
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
    assert torch.all(out[~has_key] == 0) and torch.all(lse[~has_key] == float("-inf"))


@settings(max_examples=25)
@given(case=window_cases(head_dims=(8, 16), max_tq=6, max_extra_keys=8))
def test_reference_backward_formulas_match_autograd(case: WindowCase):
    x = make_window_inputs(case, torch.float64, "cpu")
    q, k, v = (t.detach().requires_grad_() for t in (x.q, x.k, x.v))
    out, lse = reference.window_attn(q, k, v, *x.args()[3:])
    grad_out = torch.randn_like(out)
    expected = torch.autograd.grad(out, (q, k, v), grad_out)
    got = reference.window_attn_backward(grad_out, q, k, v, out, lse, *x.args()[3:])
    for name, g, e in zip(("dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(g, e, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("window,n_anchor,tree", [(0, 0, False), (2, 1, False), (1, 0, False), (3, 2, True)])
def test_reference_gradcheck_float64(window, n_anchor, tree):
    case = WindowCase(B=2, Hkv=1, group=2, D=4, Tq=3, Tk=6, kv_len=(6, 5), window=window, n_anchor=n_anchor,
                      tree=tree, random_pos=False, strided=False, scale=0.0, seed=7)
    x = make_window_inputs(case, torch.float64, "cpu")
    q, k, v = (torch.nan_to_num(t).detach().requires_grad_() for t in (x.q, x.k, x.v))
    rest = x.args()[3:]
    assert torch.autograd.gradcheck(lambda q, k, v: reference.window_attn(q, k, v, *rest)[0], (q, k, v))


# ----------------------------------------------------------------------------- backends vs reference
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_window_attn_matches_reference(backend, dtype):
    backend.skip_unsupported(dtype)

    @settings(max_examples=backend.examples(40), database=None)
    @given(case=window_cases(**case_limits(backend)))
    def check(case: WindowCase):
        x = make_window_inputs(case, dtype, backend.device)
        gold_out, gold_lse = reference.window_attn(*x.to(dtype=torch.float64).args())
        with poisoned_outputs(backend.device), backend.use():
            out, lse = ops.window_attn(*x.args())
        assert out.shape == x.q.shape and out.dtype == dtype and out.device == x.q.device
        assert lse.shape == x.q.shape[:3] and lse.dtype == torch.float32
        if dtype == torch.float32:
            assert_close_fp32("out", out, gold_out)
            assert_close_fp32("lse", lse, gold_lse)
        else:
            low_ref = window_attn_low_precision(*x.args())
            assert_within_low_precision_error("out", out, gold_out, low_ref, dtype)
            assert_close_fp32("lse", lse, gold_lse, atol=1e-4, rtol=1e-4)

    check()


def test_window_attn_gradients_match_reference(backend):
    """fp32 gradients through the op's autograd (the backend's backward) and through the
    backward op called directly, against the float64 reference."""

    @settings(max_examples=backend.examples(20), database=None)
    @given(case=window_cases(**case_limits(backend)))
    def check(case: WindowCase):
        x = make_window_inputs(case, torch.float32, backend.device)
        q, k, v = (t.detach().requires_grad_() for t in (x.q, x.k, x.v))
        rest = x.args()[3:]
        gold = x.to(dtype=torch.float64)
        gq, gk, gv = (t.detach().requires_grad_() for t in (gold.q, gold.k, gold.v))
        gold_out, gold_lse = reference.window_attn(gq, gk, gv, *gold.args()[3:])
        grad_out = torch.randn(gold_out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(case.seed))
        gold_grads = torch.autograd.grad(gold_out, (gq, gk, gv), grad_out)
        grad_out = grad_out.to(device=backend.device, dtype=torch.float32)

        with poisoned_outputs(backend.device), backend.use():
            out, lse = ops.window_attn(q, k, v, *rest)
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
            direct = ops.window_attn_backward(grad_out, q.detach(), k.detach(), v.detach(), out.detach(),
                                              lse.detach(), *rest)
        for name, g, d, e in zip(("dq", "dk", "dv"), grads, direct, gold_grads):
            assert g.shape == e.shape and d.shape == e.shape
            assert_close_fp32(f"{name} (autograd)", g, e, atol=1e-4, rtol=1e-4)
            assert_close_fp32(f"{name} (backward op)", d, e, atol=1e-4, rtol=1e-4)

    check()


def test_tree_nodes_equal_their_branch_as_a_chain(backend):
    """Each tree node's output equals plain (Tq = 1) attention over the committed prefix plus
    its root-to-node branch laid out as a chain: the tree path against the decode path."""
    limits = case_limits(backend)

    @settings(max_examples=backend.examples(20), database=None)
    @given(case=window_cases(**limits).filter(lambda c: c.tree), data=st.data())
    def check(case: WindowCase, data):
        # windows wide enough to cover every branch (the tree mask has no window), any anchors
        window = data.draw(st.one_of(st.just(0), st.integers(case.Tq, case.Tq + 10)), label="window")
        x = make_window_inputs(case, torch.float32, backend.device)
        x.window = window
        with backend.use():
            tree_out, tree_lse = ops.window_attn(*x.args())
        chains_q, chains_k, chains_v, chain_len, chain_pos = [], [], [], [], []
        for b in range(case.B):
            prefix = case.kv_len[b] - case.Tq
            for i in range(case.Tq):
                slots = list(range(prefix)) + [prefix + n for n in branch(x.parents[b], i)]
                pad = case.Tk - len(slots)
                chains_q.append(x.q[b, :, i:i + 1])
                chains_k.append(F.pad(x.k[b, :, slots], (0, 0, 0, pad), value=float("nan")))
                chains_v.append(F.pad(x.v[b, :, slots], (0, 0, 0, pad), value=float("nan")))
                chain_len.append(len(slots))
                chain_pos.append([prefix + depths(x.parents[b])[i]])
        dev = backend.device
        with backend.use():
            chain_out, chain_lse = ops.window_attn(
                torch.stack(chains_q), torch.stack(chains_k), torch.stack(chains_v),
                torch.tensor(chain_len, device=dev), torch.tensor(chain_pos, device=dev), window, x.n_anchor,
                None, x.scale)
        # chain row b * Tq + i holds node i of row b
        tree_out_rows = tree_out.permute(0, 2, 1, 3).reshape(case.B * case.Tq, case.Hq, case.D)
        tree_lse_rows = tree_lse.permute(0, 2, 1).reshape(case.B * case.Tq, case.Hq)
        assert_close_fp32("out", tree_out_rows, chain_out[:, :, 0])
        assert_close_fp32("lse", tree_lse_rows, chain_lse[:, :, 0])

    check()


def test_decode_window_equals_full_attention_on_the_visible_keys(backend):
    """A decode query with window w and n anchors equals unwindowed attention over just the
    anchor keys and the last w keys, gathered into a short cache."""

    @settings(max_examples=backend.examples(20), database=None)
    @given(case=window_cases(**{**case_limits(backend), "max_tq": 1, "trees": False}).filter(
        lambda c: not c.random_pos and c.window != 0))
    def check(case: WindowCase):
        x = make_window_inputs(case, torch.float32, backend.device)
        with backend.use():
            out, lse = ops.window_attn(*x.args())
            for b in range(case.B):
                p = int(x.q_pos[b, 0])
                low = max(p - case.window + 1, 0) if case.window > 0 else 0
                slots = sorted(set(range(min(case.n_anchor, p + 1))) | set(range(low, p + 1)))
                k_b = slots_of_larger_cache(x.k[b:b + 1, :, slots], extra_slots=2)
                v_b = slots_of_larger_cache(x.v[b:b + 1, :, slots], extra_slots=2)
                n = torch.tensor([len(slots)], device=backend.device)
                full_out, full_lse = ops.window_attn(x.q[b:b + 1], k_b, v_b, n, n[:, None] - 1, 0, 0, None, x.scale)
                assert_close_fp32(f"out[{b}]", out[b:b + 1], full_out)
                assert_close_fp32(f"lse[{b}]", lse[b:b + 1], full_lse)

    check()


def test_defaults_are_causal_attention_with_inverse_sqrt_d_scale(backend):
    gen = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, D = 2, 6, 2, 5, 32
    q, k, v = (torch.randn(B, h, T, D, generator=gen).to(backend.device) for h in (Hq, Hkv, Hkv))
    kv_len = torch.full((B,), T, device=backend.device)
    q_pos = torch.arange(T, device=backend.device).expand(B, T).contiguous()
    with backend.use():
        out, lse = ops.window_attn(q, k, v, kv_len, q_pos)
    expected = F.scaled_dot_product_attention(q.cpu().double(), k.cpu().double().repeat_interleave(3, 1),
                                              v.cpu().double().repeat_interleave(3, 1), is_causal=True)
    assert_close_fp32("out", out.cpu(), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_queries_without_visible_keys_give_zero_and_minus_inf(backend, dtype):
    backend.skip_unsupported(dtype)
    gen = torch.Generator().manual_seed(1)
    B, H, Tq, Tk, D = 2, 2, 3, 6, 16
    dev = backend.device
    q, k, v = (torch.randn(B, H, t, D, generator=gen).to(dev, dtype) for t in (Tq, Tk, Tk))
    kv_len = torch.tensor([6, 4], device=dev)
    # row 0: positions -1 (nothing visible), 0 (key 0 only), 5 (window 2: keys 4, 5);
    # row 1: position -3 (nothing), 2 and 3 (window 2, anchor 1: keys 0 + {1, 2} / {2, 3}).
    q_pos = torch.tensor([[-1, 0, 5], [-3, 2, 3]], device=dev)
    with poisoned_outputs(dev), backend.use():
        out, lse = ops.window_attn(q, k, v, kv_len, q_pos, 2, 1, None, 0.0)
    assert torch.all(out[:, :, 0] == 0), "a query with no visible key must output exact zeros"
    assert torch.all(lse[:, :, 0] == float("-inf"))
    gold_out, gold_lse = reference.window_attn(q.double(), k.double(), v.double(), kv_len, q_pos, 2, 1, None, 0.0)
    tol = 1e-5 if dtype == torch.float32 else 10 * torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), gold_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), gold_lse, atol=1e-4, rtol=1e-4)
    # query 1 of row 0 sees key 0 only: its output is v[0] exactly up to rounding
    torch.testing.assert_close(out[0, :, 1].double(), v[0, :, 0].double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=lambda d: str(d).replace("torch.", ""))
def test_low_precision_tolerance_rule_rejects_a_wrong_kernel(dtype):
    """The 2x rule is not vacuous: a kernel that drops one visible key fails it."""
    case = WindowCase(B=1, Hkv=1, group=1, D=16, Tq=1, Tk=8, kv_len=(8,), window=0, n_anchor=0, tree=False,
                      random_pos=False, strided=False, scale=0.0, seed=3)
    x = make_window_inputs(case, dtype, "cpu")
    gold, _ = reference.window_attn(*x.to(dtype=torch.float64).args())
    low_ref = window_attn_low_precision(*x.args())
    wrong, _ = reference.window_attn(x.q, x.k, x.v, x.kv_len, x.q_pos, 7, 0, None, 0.0)  # misses key 0
    with pytest.raises(AssertionError, match="exceeds"):
        assert_within_low_precision_error("out", wrong, gold, low_ref, dtype)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=lambda d: str(d).replace("torch.", ""))
def test_per_row_tolerance_rejects_dropping_one_key_of_many(dtype):
    """Issue 17: with 40 keys, dropping one key changes its query's row by ~1/40 of a value,
    which a tensor-wide maximum can hide under the other rows' rounding (a row with large
    outputs sets the ulp term); the per-row rule catches it. Query 0 of 8 misses key 0 only."""
    gen = torch.Generator().manual_seed(5)
    B, H, Tq, Tk, D = 1, 1, 8, 40, 16
    q = torch.randn(B, H, Tq, D, generator=gen).to(dtype)
    k = torch.randn(B, H, Tk, D, generator=gen).to(dtype)
    v = torch.randn(B, H, Tk, D, generator=gen)
    v[:, :, 0] = v[:, :, 1:Tk - Tq + 1].mean(dim=2) + 2    # key 0 moves query 0's row by ~2/33
    v[:, :, Tk - Tq + 1:] *= 2000                          # only the other rows see large values: big ulp term
    v = v.to(dtype)
    kv_len, q_pos = torch.tensor([Tk]), (Tk - Tq + torch.arange(Tq))[None]
    gold, _ = reference.window_attn(q.double(), k.double(), v.double(), kv_len, q_pos, 0, 0, None, 0.0)
    low_ref = window_attn_low_precision(q, k, v, kv_len, q_pos, 0, 0, None, 0.0)
    right, _ = reference.window_attn(q, k, v, kv_len, q_pos, 0, 0, None, 0.0)
    assert_within_low_precision_error("out", right, gold, low_ref, dtype)   # the rule accepts the reference
    dropped = right.clone()
    dropped[:, :, 0] = reference.window_attn(q, k, v, kv_len, q_pos, Tk - Tq, 0, None, 0.0)[0][:, :, 0]
    assert (dropped[:, :, 0].double() - gold[:, :, 0]).abs().max() > 0     # key 0 really mattered
    with pytest.raises(AssertionError, match=r"row 0 \(of 8, 1 failing\)"):
        assert_within_low_precision_error("out", dropped, gold, low_ref, dtype)
    # the tensor-wide rule this replaces would have passed it
    err = (dropped.double() - gold).abs().max()
    ref_err = (low_ref.double() - gold).abs().max()
    assert err <= 2 * ref_err + torch.finfo(dtype).eps * (1 + gold.abs().max())


def test_poisoned_outputs_reach_fresh_allocations_and_restore_the_mode():
    """The poisoning the tests rely on is real: fresh tensors start as NaN / max int."""
    was_on = torch.are_deterministic_algorithms_enabled()
    with poisoned_outputs(torch.device("cpu")):
        assert torch.isnan(torch.empty(7)).all()
        assert torch.all(torch.empty(3, dtype=torch.int64) == torch.iinfo(torch.int64).max)
    assert torch.are_deterministic_algorithms_enabled() == was_on
