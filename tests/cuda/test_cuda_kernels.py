"""Tests specific to the CUDA kernels (csrc/cuda/*.cu), beyond the shared per-op tests in
tests/ops/ (which run on the `cuda` backend too): production-sized shapes, every split-KV path
(forced split counts, more splits than keys, the automatic choice for long windows), every
kernel instantiation (row tiles of 1/4/8/16, the element-wise fallback, float64), keys outside
every window left as NaN, out-of-range values that are not checked on the GPU, a 152k-vocabulary
tree verification, and multi-batch overlapping kv_compact. Calls torch.ops.sparrow.* directly,
so it always tests the C++ CUDA kernels; skipped cleanly without a GPU or without them.
"""
from __future__ import annotations

import pytest
import torch

import sparrow_kernels  # noqa: F401  (loads the ops)
from sparrow_kernels.ops import backend, reference
from tests.ops.helpers import (assert_close_fp32, assert_within_low_precision_error, poisoned_outputs,
                               random_parents, tree_links, window_attn_low_precision)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(torch.cuda.is_available() and not backend.cuda_kernels_built(),
                       reason="sparrow_kernels._C was built without the CUDA kernels (SPARROW_CUDA=0?)"),
]

ops = torch.ops.sparrow
DEVICE = "cuda"
SPLITS_ENV = "SPARROW_WINDOW_ATTN_SPLITS"


# ----------------------------------------------------------------------------- window_attn
def window_inputs(B, Hkv, group, Tq, Tk, D, dtype, seed, *, window=0, n_anchor=0, tree=False, kv_len=None,
                  q_pos=None):
    """Random inputs on the GPU; key slots past kv_len[b] hold NaN. Decode/tree queries sit at
    the end of each row (tree queries at kv_len - Tq + depth), prefill queries at 0..Tq-1."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * group, Tq, D, generator=gen)                                 # [B, Hq, Tq, D]
    k = torch.randn(B, Hkv, Tk, D, generator=gen)                                         # [B, Hkv, Tk, D]
    v = torch.randn(B, Hkv, Tk, D, generator=gen)
    if kv_len is None:
        kv_len = torch.randint(max(Tq, Tk // 2), Tk + 1, (B,), generator=gen)             # [B]
    tree_mask = None
    if tree:
        parents = [random_parents(Tq, gen) for _ in range(B)]
        tree_mask = torch.zeros(B, Tq, Tq, dtype=torch.bool)                                # [B, Tq, Tq]
        depth = torch.zeros(B, Tq, dtype=torch.int64)                                       # [B, Tq]
        for b, par in enumerate(parents):
            for i in range(Tq):
                j = i
                while j != -1:
                    tree_mask[b, i, j] = True
                    j = par[j]
                depth[b, i] = 0 if par[i] == -1 else depth[b, par[i]] + 1
        q_pos = (kv_len - Tq)[:, None] + depth
    elif q_pos is None:
        q_pos = (kv_len - Tq)[:, None] + torch.arange(Tq)[None, :]                          # [B, Tq]
    for b in range(B):
        k[b, :, int(kv_len[b]):] = float("nan")
        v[b, :, int(kv_len[b]):] = float("nan")
    to = dict(device=DEVICE)
    return dict(q=q.to(dtype=dtype, **to), k=k.to(dtype=dtype, **to), v=v.to(dtype=dtype, **to),
                kv_len=kv_len.to(**to), q_pos=q_pos.to(**to), window=window, n_anchor=n_anchor,
                tree_mask=None if tree_mask is None else tree_mask.to(**to), scale=0.0)


def args_of(x):
    return (x["q"], x["k"], x["v"], x["kv_len"], x["q_pos"], x["window"], x["n_anchor"], x["tree_mask"], x["scale"])


def assert_matches_reference(name, x, out, lse):
    """out against a float64 gold (2x the low-precision reference's error for fp16/bf16, fp32
    tolerance otherwise); lse against the gold to fp32 rounding, -inf exactly where no key is."""
    args = args_of(x)
    gold = {key: value for key, value in x.items()}
    for key in ("q", "k", "v"):
        gold[key] = torch.nan_to_num(x[key].double())
    gold_out, gold_lse = reference.window_attn(*args_of(gold))
    dtype = x["q"].dtype
    assert out.dtype == dtype and out.shape == x["q"].shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if dtype in (torch.float16, torch.bfloat16):
        low = window_attn_low_precision(*args)
        assert_within_low_precision_error(name, out, gold_out, low, dtype)
    else:
        assert_close_fp32(name, out, gold_out)
    no_key = torch.isinf(gold_lse)
    assert torch.equal(torch.isinf(lse), no_key), f"{name}: -inf lse at the wrong rows"
    assert torch.all(out[no_key.unsqueeze(-1).expand_as(out)] == 0), f"{name}: rows without keys must be 0"
    torch.testing.assert_close(lse.double()[~no_key], gold_lse[~no_key], atol=1e-4, rtol=1e-5,
                               msg=lambda m: f"{name} lse: {m}")


def run(x):
    with poisoned_outputs(torch.device(DEVICE)):
        return ops.window_attn(*args_of(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B,window", [(1, 4096), (8, 256), (2, 0)])
def test_decode_at_qwen_shape(dtype, B, window):
    """28 query / 4 KV heads x 128 (Qwen2.5-VL-7B), an 8k cache, 64 anchors: the automatic
    split count (many splits for batch 1 and a long window)."""
    x = window_inputs(B, 4, 7, 1, 8192, 128, dtype, seed=B + window, window=window, n_anchor=64)
    out, lse = run(x)
    assert_matches_reference(f"decode B={B} w={window}", x, out, lse)


@pytest.mark.parametrize("splits", [1, 2, 7, 64, 128])
def test_forced_split_counts_agree(monkeypatch, splits):
    """The same decode with 1..128 splits (128 > the number of tiles: empty splits must merge
    as nothing) matches the reference, and every split count gives the same result."""
    x = window_inputs(3, 2, 4, 1, 700, 64, torch.bfloat16, seed=11, window=300, n_anchor=5)
    monkeypatch.setenv(SPLITS_ENV, "1")
    base, base_lse = run(x)
    monkeypatch.setenv(SPLITS_ENV, str(splits))
    out, lse = run(x)
    assert_matches_reference(f"splits={splits}", x, out, lse)
    torch.testing.assert_close(out.float(), base.float(), atol=2e-2, rtol=0)
    torch.testing.assert_close(lse, base_lse, atol=1e-5, rtol=1e-5)


def test_bad_split_override_is_rejected(monkeypatch):
    x = window_inputs(1, 1, 1, 1, 16, 16, torch.float32, seed=0)
    monkeypatch.setenv(SPLITS_ENV, "0")
    with pytest.raises(RuntimeError, match=SPLITS_ENV):
        ops.window_attn(*args_of(x))


# group x Tq picks the row tile (1, 4, 8 or 16 rows); D and dtype pick vectors or the fallback
@pytest.mark.parametrize("group,Tq,D,dtype", [
    (1, 1, 128, torch.bfloat16),   # MHA decode: 1-row tiles
    (3, 1, 64, torch.float16),     # GQA 3: 4-row tiles, one row idle
    (7, 1, 128, torch.bfloat16),   # Qwen: 8-row tiles
    (8, 1, 256, torch.float32),    # 8 rows, the largest head dim
    (4, 5, 80, torch.bfloat16),    # 20 rows: 16-row tiles across queries
    (4, 5, 256, torch.float16),    # 16-row tiles at D = 256: over 48 KiB of shared memory (opt-in)
    (2, 8, 256, torch.float32),    # the same in fp32, another kernel with the same signature
    (2, 3, 20, torch.float16),     # 40-byte rows: the element-wise fallback
    (3, 2, 17, torch.float32),     # odd head dim: the element-wise fallback
    (2, 4, 64, torch.float64),     # float64 (accumulates in float64)
])
@pytest.mark.parametrize("splits", ["1", "3"])
def test_every_instantiation(monkeypatch, group, Tq, D, dtype, splits):
    monkeypatch.setenv(SPLITS_ENV, splits)
    x = window_inputs(2, 2, group, Tq, 333, D, dtype, seed=group * 31 + Tq, window=97, n_anchor=6)
    out, lse = run(x)
    assert_matches_reference(f"group={group} Tq={Tq} D={D}", x, out, lse)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_draft_tree_of_64_nodes_over_a_long_cache(dtype):
    x = window_inputs(2, 4, 7, 64, 8192, 128, dtype, seed=5, window=2048, n_anchor=64, tree=True)
    out, lse = run(x)
    assert_matches_reference("tree64", x, out, lse)


def test_prefill_with_a_window():
    Tq = 600
    x = window_inputs(1, 2, 3, Tq, Tq, 64, torch.bfloat16, seed=3, window=128, n_anchor=16,
                      kv_len=torch.tensor([Tq]), q_pos=torch.arange(Tq)[None])
    out, lse = run(x)
    assert_matches_reference("prefill", x, out, lse)


def test_strided_views_of_a_larger_cache():
    """q as a [B, Tq, Hq, D] buffer, k the first Tk slots of a bigger cache (16-byte loads),
    and the same with v inside a cache padded to 66 elements per slot, whose rows are not
    16-byte aligned (the element-wise fallback)."""
    x = window_inputs(2, 2, 4, 3, 500, 64, torch.float16, seed=8, window=100, n_anchor=4)
    cache_k = torch.full((2, 2, 520, 64), float("nan"), dtype=torch.float16, device=DEVICE)
    cache_v = torch.full((2, 2, 520, 66), float("nan"), dtype=torch.float16, device=DEVICE)
    cache_k[:, :, :500] = x["k"]
    cache_v[:, :, 1:501, 1:65] = x["v"]
    q_view = x["q"].transpose(1, 2).contiguous().transpose(1, 2)
    aligned = dict(x, q=q_view, k=cache_k[:, :, :500])
    out, lse = run(aligned)
    assert_matches_reference("strided, aligned", x, out, lse)
    unaligned = dict(aligned, v=cache_v[:, :, 1:501, 1:65])
    out, lse = run(unaligned)
    assert_matches_reference("strided, unaligned", x, out, lse)


def test_keys_outside_every_window_are_never_used():
    """NaN in every valid slot that no query sees (between the anchors and the windows, and
    inside the gap of two far-apart queries of one row tile): the output stays finite and
    equal to the reference on the clean cache."""
    Tk, window, n_anchor = 3000, 64, 8
    q_pos = torch.tensor([[2999, 1500]])
    x = window_inputs(1, 1, 4, 2, Tk, 64, torch.float32, seed=2, window=window, n_anchor=n_anchor,
                      kv_len=torch.tensor([Tk]), q_pos=q_pos)
    visible = reference.window_visibility(x["kv_len"], x["q_pos"], Tk, window, n_anchor, None)[0].any(0)  # [Tk]
    poisoned = dict(x, k=x["k"].clone(), v=x["v"].clone())
    poisoned["k"][:, :, ~visible] = float("nan")
    poisoned["v"][:, :, ~visible] = float("nan")
    out, lse = run(poisoned)
    assert torch.isfinite(out).all()
    assert_matches_reference("unseen keys", x, out, lse)


def test_out_of_range_lengths_are_clamped_not_read():
    """kv_len is not range-checked for CUDA tensors (that needs a device sync): values past Tk
    act as Tk and negative values as 0 (no key), never an out-of-bounds read."""
    x = window_inputs(3, 1, 2, 1, 64, 32, torch.float32, seed=4, window=0, kv_len=torch.tensor([64, 64, 64]))
    bad = dict(x, kv_len=torch.tensor([64 + 100, -5, 64], device=DEVICE))
    out, lse = run(bad)
    expected, expected_lse = ops.window_attn(*args_of(x))
    torch.testing.assert_close(out[0], expected[0])
    assert torch.all(out[1] == 0) and torch.all(torch.isinf(lse[1]))


def test_launch_configuration_is_checked():
    """A 1M-token prefill without GQA needs 65536 row tiles, past gridDim.y: a clear error
    naming the op, not a failed launch."""
    Tq = 65535 * 16 + 1
    x = window_inputs(1, 1, 1, Tq, 1, 16, torch.float16, seed=0, kv_len=torch.ones(1, dtype=torch.int64),
                      q_pos=torch.arange(Tq)[None])
    with pytest.raises(RuntimeError, match=r"window_attn: CUDA grid \(1, 65536, 1\) exceeds"):
        ops.window_attn(*args_of(x))


# ----------------------------------------------------------------------------- gather_hidden
@pytest.mark.parametrize("B,T,H,n_layers,N,dtype", [
    (4, 4096, 3584, 3, 64, torch.bfloat16),   # Qwen2.5-VL-7B hidden size, EAGLE-3's three layers
    (2, 50, 24, 17, 9, torch.float32),        # more than 16 layers: two launches
    (3, 20, 3, 2, 7, torch.float16),          # 6-byte rows: 2-byte words
    (2, 10, 5, 2, 4, torch.float64),
])
def test_gather_hidden_large_and_odd(B, T, H, n_layers, N, dtype):
    gen = torch.Generator().manual_seed(H)
    hidden = [torch.randn(B, T, H, generator=gen).to(DEVICE, dtype) for _ in range(n_layers)]
    index = torch.randint(-1, T, (B, N), generator=gen).to(DEVICE)
    with poisoned_outputs(torch.device(DEVICE)):
        out = ops.gather_hidden(hidden, index)
    assert torch.equal(out, reference.gather_hidden(hidden, index))


def test_gather_hidden_strided_layers_and_bad_indices_give_zero_rows():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(2, 30, 3, 64, generator=gen).to(DEVICE)
    hidden = [base[:, :, 0], base[:, :, 2]]                        # [B, T, H] views, row stride 192
    index = torch.tensor([[0, 29, -1, 30], [-7, 5, 1000, 2]], device=DEVICE)
    out = ops.gather_hidden(hidden, index)
    clean = index.clone()
    clean[(clean < -1) | (clean >= 30)] = -1                       # unchecked on the GPU: zero rows
    assert torch.equal(out, reference.gather_hidden(hidden, clean))


# ----------------------------------------------------------------------------- tree verification
def _linked(parents_per_row):
    """next_token, next_sibling [B, N] from per-row parent lists (tests/ops/helpers.tree_links)."""
    links = [tree_links(parents) for parents in parents_per_row]
    return (torch.tensor([first for first, _ in links], dtype=torch.int64),
            torch.tensor([sibling for _, sibling in links], dtype=torch.int64))


def random_trees(B, N, gen):
    """next_token, next_sibling [B, N] of random trees in topological order."""
    return _linked([random_parents(N, gen) for _ in range(B)])


def chain_heavy_tree(B, N, gen):
    """Trees whose nodes have a few children each (like EAGLE-2 top-k trees), so paths are long."""
    return _linked([[-1] + [max(0, i - 1 - int(torch.randint(0, 3, (1,), generator=gen))) for i in range(1, N)]
                    for _ in range(B)])


@pytest.mark.parametrize("B,N", [(1, 64), (16, 30), (3, 1), (2, 600)])
def test_greedy_matches_reference(B, N):
    """Targets that mostly predict a node's first or second child: long accepted paths."""
    gen = torch.Generator().manual_seed(N)
    next_token, next_sibling = chain_heavy_tree(B, N, gen)
    candidates = torch.randint(0, 50, (B, N), generator=gen)
    predict = torch.randint(0, 50, (B, N), generator=gen)
    for b in range(B):
        for node in range(N):
            child = int(next_token[b, node])
            if child != -1 and float(torch.rand(1, generator=gen)) < 0.8:
                second = int(next_sibling[b, child])
                pick = second if second != -1 and float(torch.rand(1, generator=gen)) < 0.5 else child
                predict[b, node] = candidates[b, pick]
    expected = reference.tree_verify_greedy(candidates, predict, next_token, next_sibling)
    with poisoned_outputs(torch.device(DEVICE)):
        got = ops.tree_verify_greedy(*(t.to(DEVICE) for t in (candidates, predict, next_token, next_sibling)))
    for g, e in zip(got, expected):
        assert torch.equal(g.cpu(), e)


def residual_at_stop(target, draft, tokens, first_child, next_sibling, node):
    """The reference's residual p and its sum S at the node where the walk stopped (all of
    its children rejected), in the reference's float32 arithmetic."""
    p, q = target[node].clone(), draft[node]
    S, Q = p.sum(), q.sum()
    child = int(first_child[node])
    while child != -1:
        if Q > 0:
            p = torch.clamp_min(p / S - q / Q, 0.0)
        else:
            p[int(tokens[child])] = 0.0
        S = p.sum()
        if S <= 0:
            p = target[node].clone()
            S = p.sum()
        child = int(next_sibling[child])
    return p, S


@pytest.mark.parametrize("V", [152064, 151937])  # Qwen2.5-VL's vocabulary; an odd size takes scalar loads
@pytest.mark.parametrize("draft_known", [False, True])
def test_sample_at_a_152k_vocabulary(V, draft_known):
    """64-node trees over a 152k vocabulary, the same uniforms as the reference: the same
    accepted paths (each decision compares a uniform with a ratio of sums, so float32 sums in a
    different order flip one only with probability ~1e-6). The bonus token is an inverse-CDF
    sample over 152k tokens, where float32 cumsums in different orders legitimately differ by
    more than one token's mass: it is checked against the float64 CDF of the reference's
    residual instead, to 1e-5 of its mass (about one token), not against the reference's pick."""
    B, N = 2, 64
    gen = torch.Generator().manual_seed(V + draft_known)
    next_token, next_sibling = chain_heavy_tree(B, N, gen)
    logits = torch.randn(B, N, V, generator=gen) * 2
    favourite = torch.randint(0, V, (B, N), generator=gen)
    logits.scatter_(2, favourite[..., None], 14.0)                                      # ~25% of the mass
    target_probs = torch.softmax(logits, -1)                                            # [B, N, V]
    draft_probs = torch.softmax(logits + torch.randn(B, N, V, generator=gen), -1) if draft_known \
        else torch.zeros(B, N, V)
    candidates = favourite.roll(1, dims=1)                                              # often the parent's favourite
    candidates[:, ::3] = torch.randint(0, V, (B, (N + 2) // 3), generator=gen)
    u_accept, u_final = torch.rand(B, N, generator=gen), torch.rand(B, generator=gen)
    inputs = (candidates, target_probs, draft_probs, next_token, next_sibling, u_accept, u_final)
    expected_index, expected_len, _ = reference.tree_verify_sample(*inputs)
    with poisoned_outputs(torch.device(DEVICE)):
        accept_index, accept_len, bonus = (t.cpu() for t in ops.tree_verify_sample(*(t.to(DEVICE) for t in inputs)))
    assert torch.equal(accept_index, expected_index) and torch.equal(accept_len, expected_len)
    for b in range(B):
        stop = int(accept_index[b, int(accept_len[b]) - 1])
        p, S = residual_at_stop(target_probs[b], draft_probs[b], candidates[b], next_token[b], next_sibling[b], stop)
        cdf = torch.cumsum(p.double(), 0)
        threshold, tol, t = float(u_final[b]) * float(S), 1e-5 * float(S), int(bonus[b])
        assert 0 <= t < V and p[t] > 0, f"row {b}: bonus {t} has no residual mass"
        assert cdf[t] > threshold - tol and (t == 0 or cdf[t - 1] <= threshold + tol), \
            f"row {b}: bonus {t} is not the inverse CDF at {threshold:.6g} (cdf {cdf[t - 1]:.6g}..{cdf[t]:.6g})"


def test_sample_all_zero_target_row_gives_bonus_minus_one():
    """The CPU kernel raises for a target row without mass; a kernel cannot, it returns -1."""
    candidates = torch.zeros(1, 1, dtype=torch.int64, device=DEVICE)
    zeros = torch.zeros(1, 1, 8, device=DEVICE)
    links = torch.full((1, 1), -1, dtype=torch.int64, device=DEVICE)
    _, accept_len, bonus = ops.tree_verify_sample(candidates, zeros, zeros, links, links,
                                                  torch.rand(1, 1, device=DEVICE), torch.rand(1, device=DEVICE))
    assert accept_len.tolist() == [1] and bonus.tolist() == [-1]


def test_backward_links_end_the_walk_instead_of_looping():
    """Links are not range-checked for CUDA tensors: one pointing back (a cycle) ends the list."""
    candidates = torch.tensor([[7, 7, 7]], device=DEVICE)
    predict = torch.tensor([[7, 7, 7]], device=DEVICE)
    next_token = torch.tensor([[1, 0, -1]], device=DEVICE)      # node 1's child would be node 0
    next_sibling = torch.tensor([[-1, 1, -1]], device=DEVICE)   # node 1's sibling would be itself
    accept_index, accept_len, bonus = ops.tree_verify_greedy(candidates, predict, next_token, next_sibling)
    assert accept_index.tolist() == [[0, 1, -1]] and accept_len.tolist() == [2] and bonus.tolist() == [7]


# ----------------------------------------------------------------------------- kv_compact
@pytest.mark.parametrize("L,B,H,S,D,dtype,A", [
    (56, 8, 4, 1024, 128, torch.bfloat16, 30),   # a 28-layer K/V cache, 30-node trees
    (4, 3, 2, 300, 256, torch.float32, 64),      # 1 KiB slots x 64 accepted: several batches
    (3, 2, 2, 80, 5, torch.float16, 20),         # 10-byte slots: 2-byte words
    (2, 2, 1, 50, 3, torch.int8, 12),            # 3-byte slots: 1-byte words
])
def test_kv_compact_large_and_odd(L, B, H, S, D, dtype, A):
    gen = torch.Generator().manual_seed(S + D)
    kv = (torch.randn(L, B, H, S, D, generator=gen) * 40).to(dtype)                    # [L, B, H, S, D]
    prefix_len = torch.randint(0, S - A, (B,), generator=gen)                          # [B]
    accept_index = torch.full((B, A), -1, dtype=torch.int64)                            # [B, A]
    accept_len = torch.randint(1, A + 1, (B,), generator=gen)                           # [B]
    for b in range(B):
        n = int(accept_len[b])
        keep = torch.randperm(A - 1, generator=gen)[: n - 1] + 1                        # root always kept
        accept_index[b, :n] = torch.cat([torch.zeros(1, dtype=torch.int64), keep.sort().values])
    expected = kv.clone()
    reference.kv_compact(expected, prefix_len, accept_index, accept_len)
    got = kv.to(DEVICE)
    ops.kv_compact(got, prefix_len.to(DEVICE), accept_index.to(DEVICE), accept_len.to(DEVICE))
    got = got.cpu()
    for b in range(B):
        end = int(prefix_len[b] + accept_len[b])
        assert torch.equal(got[:, b, :, :end], expected[:, b, :, :end]), f"row {b}"


def test_kv_compact_skips_out_of_range_copies():
    """Unchecked on the GPU: an index past S or a negative one is skipped, never written."""
    kv = torch.randn(2, 1, 1, 8, 4, device=DEVICE)
    before = kv.clone()
    ops.kv_compact(kv, torch.tensor([2], device=DEVICE), torch.tensor([[0, 9, -3]], device=DEVICE),
                   torch.tensor([3], device=DEVICE))
    assert torch.equal(kv, before)
