"""Triton-specific tests of window_attn: the split-KV decode path and its log-sum-exp merge,
block skipping (keys outside the window and anchors are never read), GQA rows packed
across tile boundaries, the fused backward and the autograd.Function, tree nodes vs their
branch as a chain. Runs in the interpreter on CPU (tiny shapes) and compiled on a GPU.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparrow_kernels.ops import reference
from tests.ops.helpers import (ancestor_mask, assert_within_low_precision_error, branch, depths, poison_allocator,
                               random_parents, window_attn_low_precision)

from tests.triton.helpers import CUDA_MARKS, DEVICE, HAS_CUDA  # noqa: E402  (skips without GPU/interpreter)

pytestmark = CUDA_MARKS

from sparrow_kernels import triton_ops  # noqa: E402  (after the interpreter switch)

window_attn_module = importlib.import_module("sparrow_kernels.triton_ops.window_attn")  # the module, not the op

FP32_TOL = dict(atol=3e-5, rtol=3e-5)


# ----------------------------------------------------------------------------- inputs
def make_inputs(B, Hq, Hkv, Tq, Tk, D, kv_len, q_pos=None, tree=False, seed=0, dtype=torch.float32):
    """Random q/k/v on the CPU in float64 (the gold is computed from these), kv_len [B],
    q_pos [B, Tq] (default: the last Tq valid slots, or prefix + depth for a tree), and a
    random tree's ancestor mask when `tree`."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=gen, dtype=torch.float64)                # [B, Hq, Tq, D]
    k = torch.randn(B, Hkv, Tk, D, generator=gen, dtype=torch.float64)               # [B, Hkv, Tk, D]
    v = torch.randn(B, Hkv, Tk, D, generator=gen, dtype=torch.float64)
    kv_len = torch.tensor(kv_len, dtype=torch.int64)                                 # [B]
    tree_mask, parents = None, None
    if tree:
        parents = [random_parents(Tq, gen) for _ in range(B)]
        tree_mask = torch.stack([ancestor_mask(p) for p in parents])                # [B, Tq, Tq]
        depth = torch.tensor([depths(p) for p in parents], dtype=torch.int64)
        default_pos = (kv_len - Tq)[:, None] + depth                                 # [B, Tq]
    else:
        default_pos = (kv_len - Tq)[:, None] + torch.arange(Tq)[None, :]             # [B, Tq]
    q_pos = default_pos if q_pos is None else torch.as_tensor(q_pos, dtype=torch.int64)
    # low-precision inputs are rounded first, so gold and kernel see the same numbers
    q, k, v = (t.to(dtype).double() for t in (q, k, v))
    return q, k, v, kv_len, q_pos, tree_mask, parents


def on_device(*tensors, dtype=torch.float32):
    return [None if t is None else t.to(DEVICE, dtype=dtype if t.is_floating_point() else None) for t in tensors]


def nan_past_kv_len(t: torch.Tensor, kv_len: torch.Tensor) -> torch.Tensor:
    """Copy of a [B, H, T, D] cache with NaN in every slot past kv_len[b] (never valid keys)."""
    t = t.clone()
    for b, n in enumerate(kv_len.tolist()):
        t[b, :, n:] = float("nan")
    return t


def run_forward(q, k, v, kv_len, q_pos, window, n_anchor, tree_mask, scale=0.0, num_splits=None,
                dtype=torch.float32):
    qd, kd, vd, tm = on_device(q, k, v, tree_mask, dtype=dtype)
    kd, vd = nan_past_kv_len(kd, kv_len), nan_past_kv_len(vd, kv_len)
    poison_allocator(DEVICE)
    out, lse = triton_ops.window_attn(qd, kd, vd, kv_len.to(DEVICE), q_pos.to(DEVICE), window, n_anchor, tm,
                                      scale, num_splits=num_splits)
    return out.cpu(), lse.cpu()


def check_forward(out, lse, gold_out, gold_lse):
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.double(), gold_out, **FP32_TOL)
    assert torch.equal(torch.isinf(lse), torch.isinf(gold_lse)), "queries with no visible key must get lse = -inf"
    finite = torch.isfinite(gold_lse)
    torch.testing.assert_close(lse.double()[finite], gold_lse[finite], **FP32_TOL)


# ----------------------------------------------------------------------------- split-KV decode
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_split_kv_merges_to_the_reference(num_splits):
    # GQA 6/2 packed in one tile; row 1 is short (most splits empty), row 2's query sees no key,
    # row 3's window overlaps the anchors.
    kv_len = [300, 17, 150, 90]
    q, k, v, kv_len, _, _, _ = make_inputs(4, 6, 2, 1, 300, 32, kv_len, seed=num_splits)
    q_pos = torch.tensor([[299], [16], [-1], [9]])
    window, n_anchor = 100, 5
    gold_out, gold_lse = reference.window_attn(q, k, v, kv_len, q_pos, window, n_anchor, None, 0.0)
    out, lse = run_forward(q, k, v, kv_len, q_pos, window, n_anchor, None, num_splits=num_splits)
    check_forward(out, lse, gold_out, gold_lse)
    assert torch.all(out[2] == 0) and torch.all(torch.isneginf(lse[2]))


def test_default_num_splits_fills_the_device_with_at_least_two_blocks_per_split(monkeypatch):
    sms = 132
    monkeypatch.setattr(window_attn_module, "_sm_count", lambda index: sms)
    cuda = torch.device("cuda", 0)
    for B, Hkv, tiles, keys in [(1, 4, 1, 4160), (8, 4, 1, 4160), (1, 4, 1, 300), (2, 2, 3, 10000), (1, 1, 1, 64)]:
        splits = window_attn_module.default_num_splits(B, Hkv, tiles, keys, 64, cuda)
        programs, blocks = B * Hkv * tiles, math.ceil(keys / 64)
        assert 1 <= splits <= window_attn_module._MAX_SPLITS
        assert splits == 1 or math.ceil(blocks / splits) >= 2          # every split keeps >= 2 key blocks
        if blocks >= 4 * sms / programs:                              # enough work: the grid covers the SMs
            assert splits * programs >= sms
    assert window_attn_module.default_num_splits(64, 4, 1, 32768, 64, cuda) == 1      # grid already full
    assert window_attn_module.default_num_splits(1, 4, 1, 32768, 64, torch.device("cpu")) == 1


# ----------------------------------------------------------------------------- block skipping
@pytest.mark.parametrize("mode", ["decode", "prefill", "tree"])
def test_keys_outside_window_and_anchors_are_never_read(mode):
    """K/V slots that no query of the launch may see, outside the anchors and the window hull,
    hold NaN: a kernel that loaded their blocks would multiply 0 * NaN into the output."""
    Tk, window, n_anchor = 400, 64, 8
    kv_len = [400, 290]
    Tq = {"decode": 1, "prefill": 6, "tree": 5}[mode]
    q, k, v, kv_len, q_pos, tree_mask, _ = make_inputs(2, 4, 2, Tq, Tk, 16, kv_len, tree=mode == "tree", seed=3)
    if mode == "tree":  # queries sit at the end of the row: a window that ends well before the tree
        q_pos = q_pos - 150
    gold_out, gold_lse = reference.window_attn(q, k, v, kv_len, q_pos, window, n_anchor, tree_mask, 0.0)
    k_poisoned, v_poisoned = k.clone(), v.clone()
    for b in range(2):
        n = int(kv_len[b])
        needed = torch.zeros(Tk, dtype=torch.bool)
        needed[:n_anchor] = True
        needed[max(int(q_pos[b].min()) - window + 1, 0): int(q_pos[b].max()) + 1] = True
        if mode == "tree":
            needed[n - Tq: n] = True
        assert (~needed[:n]).sum() > 100            # most of the row is out of reach
        k_poisoned[b, :, ~needed] = float("nan")
        v_poisoned[b, :, ~needed] = float("nan")
    for num_splits in (1, 3):
        out, lse = run_forward(q, k_poisoned, v_poisoned, kv_len, q_pos, window, n_anchor, tree_mask,
                               num_splits=num_splits)
        check_forward(out, lse, gold_out, gold_lse)


# ----------------------------------------------------------------------------- GQA packing
@pytest.mark.parametrize("n_anchor", [0, 3])
def test_packed_gqa_rows_cross_tile_boundaries_forward_and_backward(n_anchor):
    # 60 queries x group 3 = 180 packed rows: tiles of 64 rows split a query's heads in two, and
    # with a window of 9 the backward's key-block programs skip the query tiles out of reach.
    B, Hq, Hkv, Tq, Tk, D = 1, 3, 1, 60, 75, 16
    q, k, v, kv_len, q_pos, _, _ = make_inputs(B, Hq, Hkv, Tq, Tk, D, [71], seed=5)
    window = 9
    gold_out, gold_lse = reference.window_attn(q, k, v, kv_len, q_pos, window, n_anchor, None, 0.0)
    out, lse = run_forward(q, k, v, kv_len, q_pos, window, n_anchor, None)
    check_forward(out, lse, gold_out, gold_lse)
    check_backward(q, k, v, kv_len, q_pos, window, n_anchor, None, 0.0, seed=5)


# ----------------------------------------------------------------------------- backward
def check_backward(q, k, v, kv_len, q_pos, window, n_anchor, tree_mask, scale, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    gold_out, gold_lse = reference.window_attn(q, k, v, kv_len, q_pos, window, n_anchor, tree_mask, scale)
    grad_out = torch.randn(gold_out.shape, generator=gen, dtype=torch.float64)
    gold = reference.window_attn_backward(grad_out, q, k, v, gold_out, gold_lse, kv_len, q_pos, window, n_anchor,
                                          tree_mask, scale)
    qd, kd, vd, god, outd, tm = on_device(q, k, v, grad_out, gold_out, tree_mask)
    kd, vd = nan_past_kv_len(kd, kv_len), nan_past_kv_len(vd, kv_len)
    poison_allocator(DEVICE)
    grads = triton_ops.window_attn_backward(god, qd, kd, vd, outd, gold_lse.float().to(DEVICE), kv_len.to(DEVICE),
                                            q_pos.to(DEVICE), window, n_anchor, tm, scale)
    for name, got, want in zip(("dq", "dk", "dv"), grads, gold):
        assert got.shape == want.shape, name
        assert not torch.isnan(got).any(), f"{name}: NaN (unwritten output or a read past kv_len)"
        torch.testing.assert_close(got.cpu().double(), want, **FP32_TOL, msg=lambda m: f"{name}: {m}")


@settings(max_examples=8 if not HAS_CUDA else 40, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.sampled_from([1, 3, 4]), D=st.sampled_from([16, 24, 40]),
       Tq=st.integers(1, 12), extra=st.integers(0, 90), window=st.sampled_from([0, 1, 3, 8, 30]),
       n_anchor=st.integers(0, 5), tree=st.booleans(), scale=st.sampled_from([0.0, 0.3]),
       seed=st.integers(0, 2**20))
def test_backward_matches_reference(B, Hkv, group, D, Tq, extra, window, n_anchor, tree, scale, seed):
    tree = tree and Tq > 1
    Tk = Tq + extra
    gen = torch.Generator().manual_seed(seed)
    kv_len = torch.randint(Tq, Tk + 1, (B,), generator=gen).tolist()
    q, k, v, kv_len, q_pos, tree_mask, _ = make_inputs(B, Hkv * group, Hkv, Tq, Tk, D, kv_len, tree=tree, seed=seed)
    check_backward(q, k, v, kv_len, q_pos, window, n_anchor, tree_mask, scale, seed)


def backward_low_precision(grad_out, q, k, v, out, lse, kv_len, q_pos, window, n_anchor, tree_mask, scale, dtype):
    """The backward as a flash kernel computes it in `dtype`: P and dS rounded to `dtype`
    before their products, fp32 accumulation (sizes the low-precision tolerance)."""
    f = torch.float32
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = scale if scale > 0 else 1.0 / math.sqrt(D)
    keys, values = k.to(f).repeat_interleave(group, 1), v.to(f).repeat_interleave(group, 1)   # [B, Hq, Tk, D]
    visible = reference.window_visibility(kv_len, q_pos, Tk, window, n_anchor, tree_mask)[:, None]
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(f), keys) * scale
    lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).to(f)[..., None]
    probs = torch.where(visible, torch.exp(scores - lse_safe), torch.zeros_like(scores))   # [B, Hq, Tq, Tk]
    d_out = grad_out.to(f)
    delta = (d_out * out.to(f)).sum(-1, keepdim=True)
    d_scores = probs * (torch.einsum("bhqd,bhkd->bhqk", d_out, values) - delta)
    probs_lp, d_scores_lp = probs.to(dtype).to(f), d_scores.to(dtype).to(f)
    dq = torch.einsum("bhqk,bhkd->bhqd", d_scores_lp, keys) * scale
    dk = torch.einsum("bhqk,bhqd->bhkd", d_scores_lp, q.to(f)).view(B, Hkv, group, Tk, D).sum(2) * scale
    dv = torch.einsum("bhqk,bhqd->bhkd", probs_lp, d_out).view(B, Hkv, group, Tk, D).sum(2)
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


LOW_PRECISION_DTYPES = [torch.float16,
                        pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
                            not HAS_CUDA, reason="the Triton interpreter cannot run bf16 dots; bf16 runs on a GPU"))]


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES)
@pytest.mark.parametrize("tree", [False, True])
def test_low_precision_forward_and_backward_within_twice_the_reference_error(dtype, tree):
    B, Hq, Hkv, Tq, Tk, D = 2, 4, 2, 6, 70, 32
    q, k, v, kv_len, q_pos, tree_mask, _ = make_inputs(B, Hq, Hkv, Tq, Tk, D, [70, 40], tree=tree, seed=11,
                                                       dtype=dtype)
    window, n_anchor = 20, 4
    gold_out, gold_lse = reference.window_attn(q, k, v, kv_len, q_pos, window, n_anchor, tree_mask, 0.0)
    qd, kd, vd, tm = on_device(q, k, v, tree_mask, dtype=dtype)
    out, lse = run_forward(q, k, v, kv_len, q_pos, window, n_anchor, tree_mask, num_splits=2, dtype=dtype)
    assert out.dtype == dtype and lse.dtype == torch.float32
    low_out = window_attn_low_precision(qd.cpu(), kd.cpu(), vd.cpu(), kv_len, q_pos, window, n_anchor,
                                        None if tm is None else tm.cpu(), 0.0)
    assert_within_low_precision_error("out", out, gold_out, low_out, dtype)

    gen = torch.Generator().manual_seed(12)
    grad_out = torch.randn(gold_out.shape, generator=gen, dtype=torch.float64).to(dtype).double()
    gold = reference.window_attn_backward(grad_out, q, k, v, gold_out, gold_lse, kv_len, q_pos, window, n_anchor,
                                          tree_mask, 0.0)
    low = backward_low_precision(grad_out.to(dtype), qd.cpu(), kd.cpu(), vd.cpu(), gold_out.to(dtype),
                                 gold_lse.float(), kv_len, q_pos, window, n_anchor,
                                 None if tm is None else tm.cpu(), 0.0, dtype)
    poison_allocator(DEVICE)
    grads = triton_ops.window_attn_backward(grad_out.to(DEVICE, dtype), qd, kd, vd, gold_out.to(DEVICE, dtype),
                                            gold_lse.float().to(DEVICE), kv_len.to(DEVICE), q_pos.to(DEVICE),
                                            window, n_anchor, tm, 0.0)
    for name, got, want, low_ref in zip(("dq", "dk", "dv"), grads, gold, low):
        assert got.dtype == dtype
        assert_within_low_precision_error(name, got.cpu(), want, low_ref, dtype)


# ----------------------------------------------------------------------------- autograd
def test_autograd_function_matches_reference_autograd_including_lse_gradient():
    B, Hq, Hkv, Tq, Tk, D = 2, 4, 1, 5, 24, 16
    q, k, v, kv_len, q_pos, tree_mask, _ = make_inputs(B, Hq, Hkv, Tq, Tk, D, [24, 13], tree=True, seed=21)
    window, n_anchor = 6, 2
    gen = torch.Generator().manual_seed(22)
    w_out = torch.randn(B, Hq, Tq, D, generator=gen, dtype=torch.float64)
    w_lse = torch.randn(B, Hq, Tq, generator=gen, dtype=torch.float64)

    def loss_of(out, lse):
        return (out.double() * w_out.to(out.device)).sum() + (lse.double() * w_lse.to(lse.device)).sum()

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    gold_out, gold_lse = reference.window_attn(*leaves, kv_len, q_pos, window, n_anchor, tree_mask, 0.0)
    assert torch.isfinite(gold_lse).all()
    loss_of(gold_out, gold_lse).backward()

    dev_leaves = [t.to(DEVICE, torch.float32).requires_grad_(True) for t in (q, k, v)]
    out, lse = triton_ops.window_attn(*dev_leaves, kv_len.to(DEVICE), q_pos.to(DEVICE), window, n_anchor,
                                      tree_mask.to(DEVICE), 0.0)
    assert out.requires_grad and out.grad_fn is not None
    loss_of(out, lse).backward()
    for name, got, want in zip(("q", "k", "v"), dev_leaves, leaves):
        torch.testing.assert_close(got.grad.cpu().double(), want.grad, **FP32_TOL, msg=lambda m: f"d{name}: {m}")


def test_fp32_uses_tf32_only_when_the_caller_allows_it():
    allowed = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert window_attn_module._dot_precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert window_attn_module._dot_precision(torch.float32) == "tf32"
        assert window_attn_module._dot_precision(torch.float16) == "tf32"  # ignored for 16-bit inputs
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


# ----------------------------------------------------------------------------- tree vs chain
def test_every_tree_node_equals_its_branch_as_a_chain_with_splits():
    """Tree mode (one launch, split-KV) vs each node's root-to-node branch laid out as a plain
    causal chain after the same prefix (one launch, a row per node)."""
    Tq, prefix, D, Hq, Hkv = 7, 40, 16, 4, 2
    window, n_anchor = 16, 3          # window > tree depth: the branch keys stay in every chain window
    q, k, v, kv_len, q_pos, tree_mask, parents = make_inputs(1, Hq, Hkv, Tq, prefix + Tq, D, [prefix + Tq],
                                                             tree=True, seed=31)
    out, lse = run_forward(q, k, v, kv_len, q_pos, window, n_anchor, tree_mask, num_splits=3)
    # chain row i: keys = prefix + the branch of node i, query = node i at position prefix + depth
    chain_k = torch.zeros(Tq, Hkv, prefix + Tq, D, dtype=torch.float64)
    chain_v = torch.zeros_like(chain_k)
    chain_len, chain_pos = [], []
    for i in range(Tq):
        path = branch(parents[0], i)
        slots = list(range(prefix)) + [prefix + node for node in path]
        chain_k[i, :, : len(slots)] = k[0][:, slots]
        chain_v[i, :, : len(slots)] = v[0][:, slots]
        chain_len.append(len(slots))
        chain_pos.append([len(slots) - 1])
    chain_q = q[0].permute(1, 0, 2)[:, :, None]                    # [Tq, Hq, 1, D]: node i as row i
    chain_out, chain_lse = run_forward(chain_q, chain_k, chain_v, torch.tensor(chain_len), torch.tensor(chain_pos),
                                       window, n_anchor, None)
    torch.testing.assert_close(out[0].permute(1, 0, 2), chain_out[:, :, 0], **FP32_TOL)
    torch.testing.assert_close(lse[0].permute(1, 0), chain_lse[:, :, 0], **FP32_TOL)
