"""Tests of sparrow_kernels/speculative/tree.py: the tree layout against a per-node Python walk, and
build_tree against a from-scratch EAGLE-2 reference in which every node's draft state is
recomputed by running its root-to-node path as a plain chain through the real draft.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparrow_kernels.speculative.engine import sampling_probs
from sparrow_kernels.speculative.tree import (CPU_SAMPLING_TREE, CPU_TREE, GPU_TREE, TreeShape, build_tree,
                                              tree_layout)
from tests.speculative.helpers import random_draft, tiny_vlm

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- layout
def _random_parents(n: int, gen: torch.Generator) -> list[int]:
    return [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]


def _walk_layout(parents: list[int]):
    """Per-node Python reference: depth, ancestor-or-self mask, first child, next sibling."""
    n = len(parents)
    depth = [0 if p < 0 else None for p in parents]
    for i in range(1, n):
        depth[i] = depth[parents[i]] + 1
    mask = [[False] * n for _ in range(n)]
    for i in range(n):
        j = i
        while j >= 0:
            mask[i][j] = True
            j = parents[j]
    children = [[c for c in range(1, n) if parents[c] == p] for p in range(n)]
    first = [cs[0] if cs else -1 for cs in children]
    sibling = [-1] * n
    for cs in children:
        for a, b in zip(cs, cs[1:]):
            sibling[a] = b
    return depth, mask, first, sibling


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), nodes=st.integers(1, 24), seed=st.integers(0, 2**31 - 1))
def test_tree_layout_matches_per_node_walk(batch, nodes, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = [_random_parents(nodes, gen) for _ in range(batch)]
    depth, mask, first, sibling = tree_layout(torch.tensor(rows))
    for b, parents in enumerate(rows):
        ref_depth, ref_mask, ref_first, ref_sibling = _walk_layout(parents)
        assert depth[b].tolist() == ref_depth
        assert mask[b].tolist() == ref_mask
        assert first[b].tolist() == ref_first
        assert sibling[b].tolist() == ref_sibling


# ----------------------------------------------------------------------------- build_tree
@pytest.fixture(scope="module")
def target():
    return tiny_vlm(seed=3, vocab_size=40)


@pytest.fixture(scope="module")
def draft(target):
    return random_draft(target, seed=5)


def _committed_cache(draft, batch: int, seed: int):
    """A draft cache holding a few random committed entries per row (different counts)."""
    gen = torch.Generator().manual_seed(seed)
    T = 6
    tokens = torch.randint(0, draft.config.vocab_size, (batch, T), generator=gen)
    features = torch.randn(batch, T, draft.config.feature_size, generator=gen)
    valid = torch.randint(1, T + 1, (batch,), generator=gen)
    cache = draft.new_cache(batch, 128)
    with torch.no_grad():
        hidden = draft.extend(cache, tokens, features, valid)                       # [B, T, H]
    root_hidden = hidden[torch.arange(batch), valid - 1]                           # [B, H]
    root_tokens = torch.randint(0, draft.config.vocab_size, (batch,), generator=gen)
    return cache, root_tokens, root_hidden


def _chain_logits(draft, cache, root_hidden, row: int, path: tuple[int, ...]) -> torch.Tensor:
    """Draft logits after the root and `path`, run as a plain chain (one node per step)."""
    B = root_hidden.shape[0]
    hidden = root_hidden[:, None, :]                                               # [B, 1, H]
    draft.reset_scratch(cache)
    for d, token in enumerate(path, start=1):
        hidden = draft.draft_step(cache, torch.full((B, 1), token), hidden, torch.full((B, 1), d),
                                  torch.ones(B, 1, d, dtype=torch.bool))
    draft.reset_scratch(cache)
    return draft.logits(hidden[row, 0]).float()                                   # [V]


def _reference_eagle2(logits_of, total_tokens: int, depth: int, top_k: int) -> dict[tuple, float]:
    """EAGLE-2 written node by node: {root-to-node token path: cumulative log-prob} of the kept nodes."""
    def children(path, score):
        logp = torch.log_softmax(logits_of(path), -1)
        top = logp.topk(min(top_k, logp.numel()))
        return [(path + (int(t),), score + float(v)) for v, t in zip(top.values, top.indices)]

    level = children((), 0.0)
    pool = list(level)
    for _ in range(depth):
        frontier = sorted(level, key=lambda node: -node[1])[:top_k]
        level = [child for path, score in frontier for child in children(path, score)]
        pool += level
    kept = sorted(pool, key=lambda node: -node[1])[:total_tokens - 1]
    return dict(kept)


def _tree_paths(tree, row: int) -> dict[tuple, float]:
    parents, tokens, scores = tree.parents[row].tolist(), tree.tokens[row].tolist(), tree.scores[row].tolist()
    out = {}
    for n in range(1, len(parents)):
        path, j = [], n
        while j > 0:
            path.append(tokens[j])
            j = parents[j]
        out[tuple(reversed(path))] = scores[n]
    return out


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 3), total_tokens=st.integers(2, 24), depth=st.integers(0, 3),
       top_k=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_build_tree_equals_node_by_node_eagle2(draft, batch, total_tokens, depth, top_k, seed):
    cache, root_tokens, root_hidden = _committed_cache(draft, batch, seed)
    with torch.no_grad():
        shape = TreeShape(total_tokens, depth, top_k)
        tree = build_tree(draft, cache, root_tokens, root_hidden, shape)
        N = tree.num_nodes
        assert N == shape.size(draft.config.vocab_size)[0] <= total_tokens
        assert tree.draft_probs is None
        assert torch.equal(tree.tokens[:, 0], root_tokens)
        node = torch.arange(N)
        assert bool((tree.parents[:, 1:] < node[1:]).all()) and bool((tree.parents[:, 0] == -1).all())
        assert int(tree.depth.max()) <= depth + 1
        ref_depth, ref_mask, ref_first, ref_sibling = tree_layout(tree.parents)
        assert torch.equal(tree.tree_mask, ref_mask) and torch.equal(tree.depth, ref_depth)
        assert torch.equal(tree.next_token, ref_first) and torch.equal(tree.next_sibling, ref_sibling)
        for b in range(batch):
            # siblings come in descending draft probability
            for i in range(1, N):
                j = int(tree.next_sibling[b, i])
                if j >= 0:
                    assert float(tree.scores[b, i]) >= float(tree.scores[b, j])
            expected = _reference_eagle2(
                lambda path: draft.logits(root_hidden[b]).float() if not path
                else _chain_logits(draft, cache, root_hidden, b, path), total_tokens, depth, top_k)
            got = _tree_paths(tree, b)
            assert set(got) == set(expected)
            for path, score in expected.items():
                assert math.isclose(got[path], score, rel_tol=1e-4, abs_tol=1e-4)


def test_chain_drafting_is_the_draft_greedy_continuation(draft):
    cache, root_tokens, root_hidden = _committed_cache(draft, 2, seed=11)
    with torch.no_grad():
        tree = build_tree(draft, cache, root_tokens, root_hidden, TreeShape(30, 4, 1))
        assert tree.num_nodes == 6                                                  # root + depth + 1
        assert tree.parents.tolist() == [[-1, 0, 1, 2, 3, 4]] * 2
        assert tree.tree_mask[0].tolist() == torch.ones(6, 6).tril().bool().tolist()
        for b in range(2):
            path = []
            for _ in range(5):
                logits = draft.logits(root_hidden[b]) if not path else _chain_logits(draft, cache, root_hidden, b,
                                                                                     tuple(path))
                path.append(int(logits.argmax()))
            assert tree.tokens[b, 1:].tolist() == path


def test_root_only_tree_and_bad_settings(draft):
    cache, root_tokens, root_hidden = _committed_cache(draft, 2, seed=1)
    tree = build_tree(draft, cache, root_tokens, root_hidden, TreeShape(total_tokens=1))
    assert tree.num_nodes == 1 and tree.tree_mask.tolist() == [[[True]], [[True]]]
    assert tree.next_token.tolist() == [[-1], [-1]]
    for bad in (dict(total_tokens=0), dict(depth=-1), dict(top_k=0)):
        with pytest.raises(ValueError, match=list(bad)[0]):
            TreeShape(**bad)
    with pytest.raises(ValueError, match="shape must be a TreeShape"):
        build_tree(draft, cache, root_tokens, root_hidden, (30, 3, 8))


def test_top_k_larger_than_vocabulary_is_clamped():
    small = tiny_vlm(seed=0, vocab_size=5)
    d = random_draft(small)
    cache, root_tokens, root_hidden = _committed_cache(d, 2, seed=2)
    with torch.no_grad():
        tree = build_tree(d, cache, root_tokens, root_hidden, TreeShape(30, 2, 8))
    assert tree.num_nodes == 30                                                   # 5 + 25 + 25 drafted, 29 kept
    for b in range(2):
        for parent in range(30):
            siblings = tree.tokens[b][tree.parents[b] == parent].tolist()
            assert len(siblings) == len(set(siblings)) <= 5                        # distinct, at most V


# ----------------------------------------------------------------------------- sampled trees
@settings(max_examples=8, deadline=None)
@given(total_tokens=st.integers(2, 30), depth=st.integers(0, 3), top_k=st.integers(1, 8),
       seed=st.integers(0, 2**31 - 1))
def test_sampled_tree_records_the_distributions_it_drew_from(draft, total_tokens, depth, top_k, seed):
    batch = 2
    cache, root_tokens, root_hidden = _committed_cache(draft, batch, seed)
    sampler = lambda logits: sampling_probs(logits, temperature=0.8, top_p=0.9)  # noqa: E731
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        shape = TreeShape(total_tokens, depth, top_k)
        tree = build_tree(draft, cache, root_tokens, root_hidden, shape, sampler=sampler, generator=gen)
        N = tree.num_nodes
        assert N == shape.size(draft.config.vocab_size, sampled=True)[0] <= total_tokens
        assert tree.draft_probs.shape == (batch, N, draft.config.vocab_size)
        for b in range(batch):
            paths = {0: ()}
            for n in range(1, N):
                paths[n] = paths[int(tree.parents[b, n])] + (int(tree.tokens[b, n]),)
            for n in range(N):
                has_children = int(tree.next_token[b, n]) >= 0
                row = tree.draft_probs[b, n]
                if not has_children:
                    assert float(row.abs().sum()) == 0.0
                    continue
                logits = draft.logits(root_hidden[b]) if n == 0 else _chain_logits(draft, cache, root_hidden, b,
                                                                                     paths[n])
                torch.testing.assert_close(row, sampler(logits), rtol=1e-4, atol=1e-6)
                child = int(tree.next_token[b, n])
                while child >= 0:
                    token = int(tree.tokens[b, child])
                    assert float(row[token]) > 0                                     # drawn from the row
                    assert math.isclose(float(tree.scores[b, child]),
                                        float(tree.scores[b, n]) + math.log(float(row[token])), abs_tol=1e-4)
                    child = int(tree.next_sibling[b, child])


def test_sampled_root_children_are_iid_draws():
    """Every row below shares one root state, so the first and the last child of the root
    are, over rows, samples of the draft distribution q: chi-square against q."""
    target = tiny_vlm(seed=0, vocab_size=6)
    d = random_draft(target, seed=1)
    rows = 3000
    cache, _, root_hidden = _committed_cache(d, 1, seed=4)
    root_hidden = root_hidden.expand(rows, -1).contiguous()
    cache = d.new_cache(rows, 8)
    sampler = lambda logits: sampling_probs(logits, temperature=1.0)  # noqa: E731
    with torch.no_grad():
        q = sampler(d.logits(root_hidden[0]))
        tree = build_tree(d, cache, torch.zeros(rows, dtype=torch.int64), root_hidden, TreeShape(4, 0, 3),
                          sampler=sampler, generator=torch.Generator().manual_seed(0))
    for column in (1, 3):
        counts = torch.bincount(tree.tokens[:, column], minlength=6).double()
        expected = q.double() * rows
        stat = float(((counts - expected) ** 2 / expected).sum())
        p_value = float(torch.special.gammaincc(torch.tensor(2.5, dtype=torch.float64),
                                                torch.tensor(stat / 2, dtype=torch.float64)))
        assert p_value > 1e-3, (counts, expected)


# ----------------------------------------------------------------------------- TreeShape
def test_tree_shape_validates_and_counts_nodes():
    for bad, name in ((dict(total_tokens=0), "total_tokens"), (dict(depth=-1), "depth"), (dict(top_k=0), "top_k"),
                      (dict(top_k=2.0), "top_k")):
        with pytest.raises(ValueError, match=name):
            TreeShape(**bad)
    # top-k: level 1 has top_k children of the root, then depth levels of top_k x top_k, pruned to the budget
    assert TreeShape(30, 3, 8).level_shapes(1000) == [(1, 8), (8, 8), (8, 8), (8, 8)]
    assert TreeShape(30, 3, 8).size(1000) == (30, 24)
    assert TreeShape(12, 5, 2).size(1000) == (12, 10)
    assert TreeShape(6, 4, 1).size(1000) == (6, 4)          # a chain: depth + 1 drafted tokens
    assert TreeShape(30, 2, 8).size(5)[0] == 30              # children clamp to the vocabulary
    assert TreeShape(total_tokens=1).size(1000) == (1, 0)
    assert TreeShape(10, 2, 2).size(1000, sampled=True)[0] <= 10
    assert TreeShape.for_device("cpu") == CPU_TREE and TreeShape.for_device("cuda") == GPU_TREE
    # greedy on a CPU: a chain; sampling on a CPU: the branching tree; a GPU: one tree for both
    assert CPU_TREE.top_k == 1 and CPU_SAMPLING_TREE.top_k > 1
    assert TreeShape.for_device("cpu", 0.0) == CPU_TREE and TreeShape.for_device("cpu", 0.7) == CPU_SAMPLING_TREE
    assert TreeShape.for_device("cuda", 0.7) == GPU_TREE
    assert CPU_TREE.replace(depth=None, top_k=3) == TreeShape(8, 6, 3)
