"""Tests specific to the C++ CPU kernels (csrc/*.cpp), beyond the shared per-op tests:
window skipping over long caches (invisible keys are never read), float64 exactness and
gradcheck of the C++ backward, strided inputs, thread-count determinism, bit-identical
sampling at a large vocabulary, odd kv_compact dtypes, and C++ messages equal to the
Python front's. Calls torch.ops.sparrow.* directly, so it always tests the C++ kernels.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparrow_kernels
from sparrow_kernels.ops import reference

ops = torch.ops.sparrow


@contextlib.contextmanager
def num_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def window_inputs(B, Hkv, group, Tq, Tk, D, dtype, seed, tree=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * group, Tq, D, generator=gen, dtype=torch.float64).to(dtype)  # [B, Hq, Tq, D]
    k = torch.randn(B, Hkv, Tk, D, generator=gen, dtype=torch.float64).to(dtype)          # [B, Hkv, Tk, D]
    v = torch.randn(B, Hkv, Tk, D, generator=gen, dtype=torch.float64).to(dtype)          # [B, Hkv, Tk, D]
    kv_len = torch.randint(Tq if tree else 1, Tk + 1, (B,), generator=gen)               # [B]
    q_pos = (kv_len[:, None] - Tq + torch.arange(Tq)[None, :]).clamp_min(0)               # [B, Tq]
    tree_mask = (torch.rand(B, Tq, Tq, generator=gen) < 0.5) if tree else None            # [B, Tq, Tq]
    return q, k, v, kv_len, q_pos, tree_mask


# ----------------------------------------------------------------------------- shared-keys path
@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 3), Hkv=st.integers(1, 2), group=st.integers(1, 4), Tq=st.integers(1, 9),
       D=st.sampled_from([8, 20, 32, 40, 64]),
       window=st.one_of(st.sampled_from([0, -1]), st.integers(140, 1400)), n_anchor=st.integers(0, 6),
       layout=st.sampled_from(["tree", "chain", "random_pos"]), threads=st.sampled_from([1, 2, 3]),
       seed=st.integers(0, 2**16))
def test_long_shared_keys_path_matches_reference(B, Hkv, group, Tq, D, window, n_anchor, layout, threads, seed):
    """fp32: the window keys every query of a row sees (>= 128 of them, past the anchors) go
    through csrc/window_attn_shared.cpp (all of a head's queries per key block, key chunks
    across threads, merged by log-sum-exp), the anchors, the rest of each window and the tree
    through the per-query path. Unlimited and long windows, ragged rows (some too short for
    the shared path), odd query-row counts, head dims that are not a multiple of 8 or 32,
    trees, queries at random positions, and NaN past each row's kv_len."""
    gen = torch.Generator().manual_seed(seed)
    Tk = 1400
    tree = layout == "tree" and Tq > 1
    q = torch.randn(B, Hkv * group, Tq, D, generator=gen)                                     # [B, Hq, Tq, D]
    k = torch.randn(B, Hkv, Tk, D, generator=gen) * 2
    v = torch.randn(B, Hkv, Tk, D, generator=gen)
    kv_len = torch.randint(Tq, Tk + 1, (B,), generator=gen)                                  # [B]
    kv_len[0] = torch.randint(600, Tk + 1, (1,), generator=gen)                             # one row surely long
    if layout == "random_pos":
        q_pos = (torch.rand(B, Tq, generator=gen) * kv_len[:, None]).long()                   # [B, Tq]
    else:
        q_pos = (kv_len[:, None] - Tq + torch.arange(Tq)[None, :]).clamp_min(0)
    tree_mask = ((torch.rand(B, Tq, Tq, generator=gen) < 0.5) | torch.eye(Tq, dtype=torch.bool)) if tree else None
    gold_out, gold_lse = reference.window_attn(q.double(), k.double(), v.double(), kv_len, q_pos, window, n_anchor,
                                               tree_mask, 0.0)
    for b in range(B):
        k[b, :, int(kv_len[b]):] = float("nan")
        v[b, :, int(kv_len[b]):] = float("nan")
    with num_threads(threads):
        out, lse = ops.window_attn(q, k, v, kv_len, q_pos, window, n_anchor, tree_mask, 0.0)
    torch.testing.assert_close(out.double(), gold_out, atol=5e-6, rtol=5e-6)
    torch.testing.assert_close(lse.double(), gold_lse, atol=5e-6, rtol=5e-6)


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                    reason="this CPU has no AVX-512: the AVX2 build is the one the other tests ran")
def test_avx2_build_of_the_shared_keys_loop_on_an_avx512_cpu():
    """The hot loop is compiled for baseline x86-64, AVX2 and AVX-512 and picked once per
    process; on an AVX-512 CPU the tests above ran the AVX-512 build, so the property test
    runs again in a fresh process held to the AVX2 build (SPARROW_CPU_ISA=avx2)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, SPARROW_CPU_ISA="avx2")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"{__file__}::test_long_shared_keys_path_matches_reference"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_shared_keys_path_is_thread_count_independent_up_to_rounding():
    """The key chunks follow the thread count; the results agree to fp32 rounding."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 14, 32, generator=gen)
    k, v = torch.randn(1, 2, 5000, 32, generator=gen), torch.randn(1, 2, 5000, 32, generator=gen)
    kv_len, q_pos = torch.tensor([5000]), torch.full((1, 14), 4999)
    runs = []
    for threads in (1, 2, 4):
        with num_threads(threads):
            runs.append(ops.window_attn(q, k, v, kv_len, q_pos, 0, 0, None, 0.0))
    for out, lse in runs[1:]:
        torch.testing.assert_close(out, runs[0][0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(lse, runs[0][1], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- window skipping
@settings(max_examples=8)
@given(window=st.integers(1, 24), n_anchor=st.integers(0, 6), tree=st.booleans(), seed=st.integers(0, 2**16))
def test_invisible_keys_are_never_read(window, n_anchor, tree, seed):
    """Keys outside the anchors, the window and the tree hold NaN: a kernel that visits them
    (even to multiply by a zero weight) returns NaN; ours must match the reference run on the
    clean cache. Tk is long so that almost every key is invisible."""
    B, Hkv, group, Tq, Tk, D = 2, 2, 2, 4, 700, 32
    q, k, v, kv_len, q_pos, tree_mask = window_inputs(B, Hkv, group, Tq, Tk, D, torch.float32, seed, tree)
    visible = reference.window_visibility(kv_len, q_pos, Tk, window, n_anchor, tree_mask)   # [B, Tq, Tk]
    read = visible.any(dim=1)                                                              # [B, Tk]
    k_poisoned = k.masked_fill(~read[:, None, :, None], float("nan"))
    v_poisoned = v.masked_fill(~read[:, None, :, None], float("nan"))
    out, lse = ops.window_attn(q, k_poisoned, v_poisoned, kv_len, q_pos, window, n_anchor, tree_mask, 0.0)
    gold_out, gold_lse = reference.window_attn(q.double(), k.double(), v.double(), kv_len, q_pos, window, n_anchor,
                                               tree_mask, 0.0)
    torch.testing.assert_close(out.double(), gold_out, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(lse.double(), gold_lse, atol=2e-6, rtol=2e-6)

    grad_out = torch.randn_like(out)
    dq, dk, dv = ops.window_attn_backward(grad_out, q, k_poisoned, v_poisoned, out, lse, kv_len, q_pos, window,
                                          n_anchor, tree_mask, 0.0)
    gold = reference.window_attn_backward(grad_out.double(), q.double(), k.double(), v.double(), gold_out, gold_lse,
                                          kv_len, q_pos, window, n_anchor, tree_mask, 0.0)
    for got, want in zip((dq, dk, dv), gold):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert bool((dk[~read[:, None, :, None].expand_as(dk)] == 0).all()), "dk of never-visible keys must be 0"


# ----------------------------------------------------------------------------- float64
@settings(max_examples=10)
@given(group=st.sampled_from([1, 3]), window=st.integers(-1, 9), n_anchor=st.integers(0, 3), tree=st.booleans(),
       seed=st.integers(0, 2**16))
def test_float64_matches_reference_to_rounding(group, window, n_anchor, tree, seed):
    q, k, v, kv_len, q_pos, tree_mask = window_inputs(2, 2, group, 5, 23, 24, torch.float64, seed, tree)
    args = (kv_len, q_pos, window, n_anchor, tree_mask, 0.0)
    out, lse = ops.window_attn(q, k, v, *args)
    gold_out, gold_lse = reference.window_attn(q, k, v, *args)
    assert lse.dtype == torch.float64
    torch.testing.assert_close(out, gold_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, gold_lse, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("tree", [False, True])
def test_gradcheck_of_the_cpp_backward(tree):
    """torch.ops.sparrow.window_attn's autograd (registered by sparrow_kernels.ops) calls the
    C++ window_attn_backward: numerical vs analytic gradients in float64."""
    q, k, v, kv_len, q_pos, tree_mask = window_inputs(2, 1, 2, 3, 9, 8, torch.float64, seed=7, tree=tree)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def attend(q, k, v):
        return ops.window_attn(q, k, v, kv_len, q_pos, 3, 1, tree_mask, 0.0)[0]

    assert torch.autograd.gradcheck(attend, (q, k, v))


def test_extreme_positions_and_windows_do_not_overflow():
    """The visible ranges are computed without int64 overflow for any q_pos / window."""
    big = 2**62
    q, k, v, kv_len, _, _ = window_inputs(1, 1, 1, 4, 12, 8, torch.float32, seed=1)
    q_pos = torch.tensor([[big, -big, 5, 2**63 - 1]])
    for window, n_anchor in ((5, 2), (big, 0), (-big, 3), (1, big)):
        args = (kv_len, q_pos, window, n_anchor, None, 0.0)
        out, lse = ops.window_attn(q, k, v, *args)
        gold_out, gold_lse = reference.window_attn(q.double(), k.double(), v.double(), *args)
        torch.testing.assert_close(out.double(), gold_out, atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(lse.double(), gold_lse, atol=2e-6, rtol=2e-6)


# ----------------------------------------------------------------------------- layouts, threads
def test_strided_inputs_with_a_contiguous_last_dim():
    """q, k, v as views of [B, T, H, D] buffers (the layout of a projection output)."""
    gen = torch.Generator().manual_seed(3)
    B, Hkv, group, Tq, Tk, D = 2, 2, 2, 3, 17, 16
    q = torch.randn(B, Tq, Hkv * group, D, generator=gen).transpose(1, 2)   # [B, Hq, Tq, D], strided
    kv = torch.randn(2, B, Tk + 3, Hkv, D, generator=gen)
    k, v = kv[0, :, 3:].transpose(1, 2), kv[1, :, 3:].transpose(1, 2)      # [B, Hkv, Tk, D], strided
    kv_len = torch.tensor([Tk, 9])
    q_pos = torch.tensor([[14, 15, 16], [6, 7, 8]])
    args = (kv_len, q_pos, 5, 2, None, 0.0)
    out, lse = ops.window_attn(q, k, v, *args)
    gold_out, gold_lse = reference.window_attn(q.double(), k.double(), v.double(), *args)
    torch.testing.assert_close(out.double(), gold_out, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(lse.double(), gold_lse, atol=2e-6, rtol=2e-6)
    assert out.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("tree", [False, True])
def test_low_precision_backward_matches_the_reference(dtype, tree):
    """fp16/bf16 dq, dk, dv of the C++ backward against the float64 reference (same out and
    lse), each row within 2x the error of the reference computed in the same precision."""
    from tests.ops.helpers import assert_within_low_precision_error
    q, k, v, kv_len, q_pos, tree_mask = window_inputs(2, 2, 2, 6, 45, 32, dtype, seed=21, tree=tree)
    args = (kv_len, q_pos, 9, 2, tree_mask, 0.0)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    out, lse = ops.window_attn(q, k, v, *args)
    got = ops.window_attn_backward(grad_out, q, k, v, out, lse, *args)
    gold = reference.window_attn_backward(grad_out.double(), q.double(), k.double(), v.double(), out.double(),
                                          lse.double(), *args)
    low = reference.window_attn_backward(grad_out, q, k, v, out, lse, *args)
    for name, g, want, lo in zip(("dq", "dk", "dv"), got, gold, low):
        assert g.dtype == dtype
        assert_within_low_precision_error(name, g, want, lo, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_do_not_depend_on_the_thread_count(dtype):
    """Every output element is computed by one thread in a fixed order: bit-identical."""
    q, k, v, kv_len, q_pos, tree_mask = window_inputs(3, 2, 2, 6, 40, 32, dtype, seed=11, tree=True)
    args = (kv_len, q_pos, 7, 2, tree_mask, 0.0)
    grad_out = torch.randn(q.shape).to(dtype)
    results = []
    for n in (1, 2):
        with num_threads(n):
            out, lse = ops.window_attn(q, k, v, *args)
            grads = ops.window_attn_backward(grad_out, q, k, v, out, lse, *args)
            results.append((out, lse, *grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- tree_verify_sample
def chain_of_siblings(B: int, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Root with children 1..N/2 (siblings), node i in the first half has child i + N/2."""
    half = N // 2
    next_token = torch.full((B, N), -1)
    next_sibling = torch.full((B, N), -1)
    next_token[:, 0] = 1
    for i in range(1, half + 1):
        if i < half:
            next_sibling[:, i] = i + 1
        if i + half < N:
            next_token[:, i] = i + half
    return next_token, next_sibling


@pytest.mark.parametrize("threads", [1, 2])
def test_sampling_is_bit_identical_to_the_reference_at_a_large_vocabulary(threads):
    """V above ATen's parallel grain (32768): the sums must still match the reference's."""
    B, N, V = 2, 9, 40000
    gen = torch.Generator().manual_seed(5)
    next_token, next_sibling = chain_of_siblings(B, N)
    with num_threads(threads):
        for trial in range(4):
            target = torch.softmax(torch.randn(B, N, V, generator=gen) * 4, dim=-1)   # [B, N, V]
            draft = torch.softmax(torch.randn(B, N, V, generator=gen) * 4, dim=-1)    # [B, N, V]
            if trial % 2:
                draft[:, : N // 2] = 0  # target-only rejection at the upper nodes
            candidates = torch.multinomial(target.view(-1, V), 1, generator=gen).view(B, N)  # [B, N]
            u_accept, u_final = torch.rand(B, N, generator=gen), torch.rand(B, generator=gen)
            args = (candidates, target, draft, next_token, next_sibling, u_accept, u_final)
            got, want = ops.tree_verify_sample(*args), reference.tree_verify_sample(*args)
            for a, b in zip(got, want):
                assert torch.equal(a, b), (trial, got, want)


# ----------------------------------------------------------------------------- kv_compact dtypes
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, torch.float64, torch.bool])
def test_kv_compact_moves_any_dtype(dtype):
    gen = torch.Generator().manual_seed(2)
    L, B, H, S, D = 3, 2, 2, 12, 5
    kv = (torch.randn(L, B, H, S, D, generator=gen) * 8).to(dtype)                 # [L, B, H, S, D]
    prefix_len = torch.tensor([2, 5])
    accept_index = torch.tensor([[0, 3, 4, 7], [1, 2, -1, -1]])
    accept_len = torch.tensor([4, 2])
    got, want = kv.clone(), kv.clone()
    ops.kv_compact(got, prefix_len, accept_index, accept_len)
    reference.kv_compact(want, prefix_len, accept_index, accept_len)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


# ----------------------------------------------------------------------------- messages
def _message(backend: str, fn, *args) -> str:
    with sparrow_kernels.use_backend(backend), pytest.raises((RuntimeError, ValueError)) as err:
        fn(*args)
    return str(err.value).splitlines()[0]


def _bad_calls():
    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
    kv_len, q_pos = torch.tensor([10, 7]), torch.tensor([[7, 8, 9], [4, 5, 6]])
    good = dict(q=q, k=k, v=v, kv_len=kv_len, q_pos=q_pos, window=4, n_anchor=1, tree_mask=None, scale=0.0)
    fw = sparrow_kernels.ops.window_attn
    hidden, index = [torch.randn(2, 6, 8)] * 2, torch.tensor([[0, 5, -1], [1, 2, 3]])
    cand, links = torch.tensor([[5, 1, 2]]), (torch.tensor([[1, 1, -1]]), torch.tensor([[-1, 2, -1]]))
    kv = torch.zeros(2, 2, 1, 8, 4)
    return {
        "k rank": (fw, {**good, "k": k[0]}),
        "v shape": (fw, {**good, "v": v[:, :, :9]}),
        "dtype mix": (fw, {**good, "k": k.half(), "v": v.half()}),
        "gqa": (fw, {**good, "k": torch.randn(2, 3, 10, 16), "v": torch.randn(2, 3, 10, 16)}),
        "head dim": (fw, {**good, "q": torch.randn(2, 4, 3, 300), "k": torch.randn(2, 2, 10, 300),
                          "v": torch.randn(2, 2, 10, 300)}),
        "last dim stride": (fw, {**good, "q": torch.randn(2, 4, 3, 32)[..., ::2]}),
        "kv_len dtype": (fw, {**good, "kv_len": kv_len.int()}),
        "kv_len range": (fw, {**good, "kv_len": torch.tensor([10, 11])}),
        "kv_len tree": (fw, {**good, "kv_len": torch.tensor([10, 2]), "tree_mask": torch.ones(2, 3, 3, dtype=torch.bool)}),
        "tree_mask dtype": (fw, {**good, "tree_mask": torch.ones(2, 3, 3)}),
        "n_anchor": (fw, {**good, "n_anchor": -1}),
        "gather index": (sparrow_kernels.ops.gather_hidden, {"hidden": hidden, "index": index + 1}),
        "gather empty": (sparrow_kernels.ops.gather_hidden, {"hidden": [], "index": index}),
        "greedy links": (sparrow_kernels.ops.tree_verify_greedy,
                         {"candidates": cand, "target_predict": cand, "next_token": links[0], "next_sibling": links[1]}),
        "kv_compact order": (sparrow_kernels.ops.kv_compact,
                             {"kv": kv, "prefix_len": torch.tensor([1, 1]), "accept_index": torch.tensor([[0, 2], [3, 3]]),
                              "accept_len": torch.tensor([2, 2])}),
        "kv_compact range": (sparrow_kernels.ops.kv_compact,
                             {"kv": kv, "prefix_len": torch.tensor([1, 5]), "accept_index": torch.tensor([[0, 2], [0, 3]]),
                              "accept_len": torch.tensor([2, 2])}),
        "kv_compact not contiguous": (sparrow_kernels.ops.kv_compact,
                                      {"kv": kv.transpose(3, 4), "prefix_len": torch.tensor([0, 0]),
                                       "accept_index": torch.tensor([[0], [0]]), "accept_len": torch.tensor([1, 1])}),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_cpp_messages_equal_the_python_front(case):
    """The C++ checks (csrc/checks.h) and the Python checks (sparrow_kernels/ops/__init__.py, used by
    the reference and Triton backends) reject the same input with the same words."""
    fn, kwargs = _bad_calls()[case]
    cpp = _message("cpu", lambda: fn(**kwargs))
    python = _message("reference", lambda: fn(**kwargs))
    assert cpp == python
