"""Triton-specific tests of tree_verify_greedy / tree_verify_sample: accept paths equal to
the reference on random trees with long accepted branches, vocabularies spanning several
chunks of the residual pass, the S <= 0 guard and the inverse-CDF fallback, and termination
on malformed sibling links."""
from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparrow_kernels.ops import reference
from tests.ops.helpers import poison_allocator, random_parents, tree_links

from tests.triton.helpers import CUDA_MARKS, DEVICE, HAS_CUDA  # noqa: E402  (skips without GPU/interpreter)

pytestmark = CUDA_MARKS

from sparrow_kernels import triton_ops  # noqa: E402  (after the interpreter switch)


def random_tree_batch(B, N, gen):
    """next_token, next_sibling [B, N] and parents per row of random topological trees."""
    parents = [random_parents(N, gen) for _ in range(B)]
    links = [tree_links(p) for p in parents]
    next_token = torch.tensor([fc for fc, _ in links], dtype=torch.int64)       # [B, N]
    next_sibling = torch.tensor([ns for _, ns in links], dtype=torch.int64)     # [B, N]
    return next_token, next_sibling, parents


def assert_same_outputs(got, expected):
    for name, g, e in zip(("accept_index", "accept_len", "bonus_token"), got, expected):
        assert g.dtype == torch.int64, name
        assert torch.equal(g.cpu(), e), f"{name}: triton {g.cpu().tolist()} != reference {e.tolist()}"


def on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


# ----------------------------------------------------------------------------- greedy
@settings(max_examples=15 if not HAS_CUDA else 100, deadline=None)
@given(B=st.integers(1, 4), N=st.integers(1, 40), vocab=st.integers(1, 4), seed=st.integers(0, 2**20))
def test_greedy_equals_reference_with_long_accepted_branches(B, N, vocab, seed):
    # A tiny vocabulary makes matches frequent, so paths run deep and siblings compete.
    gen = torch.Generator().manual_seed(seed)
    next_token, next_sibling, _ = random_tree_batch(B, N, gen)
    candidates = torch.randint(0, vocab, (B, N), generator=gen)
    target_predict = torch.randint(0, vocab, (B, N), generator=gen)
    expected = reference.tree_verify_greedy(candidates, target_predict, next_token, next_sibling)
    poison_allocator(DEVICE)
    got = triton_ops.tree_verify_greedy(*on_device(candidates, target_predict, next_token, next_sibling))
    assert_same_outputs(got, expected)


def test_greedy_terminates_on_cyclic_sibling_links():
    """A sibling cycle (malformed input the reference would loop on) ends the scan after N
    steps instead of hanging the GPU; the root-only path is returned."""
    next_token = torch.tensor([[1, -1, -1, -1]])
    next_sibling = torch.tensor([[-1, 2, 1, -1]])                  # 1 -> 2 -> 1 -> ...
    candidates = torch.tensor([[5, 6, 7, 8]])
    target_predict = torch.tensor([[9, 0, 0, 0]])                  # no child matches
    index, length, bonus = triton_ops.tree_verify_greedy(*on_device(candidates, target_predict, next_token,
                                                                    next_sibling))
    assert index.cpu().tolist() == [[0, -1, -1, -1]] and length.tolist() == [1] and bonus.tolist() == [9]


# ----------------------------------------------------------------------------- sampling
def random_probs(shape, gen, sharpness, zero_fraction=0.0):
    logits = torch.randn(shape, generator=gen) * sharpness
    if zero_fraction:
        logits[torch.rand(shape, generator=gen) < zero_fraction] = float("-inf")
        logits[..., 0] = 0.0                                       # keep every row non-empty
    return torch.softmax(logits, dim=-1)


@settings(max_examples=10 if not HAS_CUDA else 60, deadline=None)
@given(B=st.integers(1, 3), N=st.integers(1, 12), vocab=st.sampled_from([3, 17, 4100, 9000]),
       draft_known=st.sampled_from(["all", "none", "mixed"]), sharpness=st.sampled_from([0.5, 3.0]),
       sparse=st.booleans(), seed=st.integers(0, 2**20))
def test_sample_equals_reference(B, N, vocab, draft_known, sharpness, sparse, seed):
    gen = torch.Generator().manual_seed(seed)
    next_token, next_sibling, _ = random_tree_batch(B, N, gen)
    target_probs = random_probs((B, N, vocab), gen, sharpness, 0.5 if sparse else 0.0)   # [B, N, V]
    draft_probs = random_probs((B, N, vocab), gen, sharpness, 0.5 if sparse else 0.0)
    if draft_known == "none":
        draft_probs.zero_()
    elif draft_known == "mixed":
        draft_probs[:, ::2] = 0.0
    # candidates drawn from the draft (or the target) so that acceptances happen
    source = torch.where(draft_probs.sum(-1, keepdim=True) > 0, draft_probs, target_probs)
    candidates = torch.multinomial(source.view(-1, vocab), 1, generator=gen).view(B, N)
    uniform_accept = torch.rand(B, N, generator=gen)
    uniform_final = torch.rand(B, generator=gen)
    args = (candidates, target_probs, draft_probs, next_token, next_sibling, uniform_accept, uniform_final)
    expected = reference.tree_verify_sample(*args)
    poison_allocator(DEVICE)
    got = triton_ops.tree_verify_sample(*on_device(*args))
    assert_same_outputs(got, expected)


def test_sample_guard_restores_the_target_when_the_residual_vanishes():
    """Draft == target and both children carry token 3, of probability 0 under both: each is
    rejected and leaves max(p/S - q/Q, 0) all zero, so the residual falls back to the target
    row (docs/ops.md's guard) and the bonus is sampled from it: 0.6 of the mass -> token 1.
    Without the guard the residual would be empty and no token could be drawn."""
    probs = torch.tensor([0.5, 0.25, 0.25, 0.0])
    target_probs = probs.repeat(1, 3, 1)                           # [1, 3, 4]
    draft_probs = target_probs.clone()
    candidates = torch.tensor([[0, 3, 3]])
    next_token = torch.tensor([[1, -1, -1]])
    next_sibling = torch.tensor([[-1, 2, -1]])
    uniform_accept = torch.tensor([[0.0, 0.3, 0.99]])
    uniform_final = torch.tensor([0.6])
    args = (candidates, target_probs, draft_probs, next_token, next_sibling, uniform_accept, uniform_final)
    expected = reference.tree_verify_sample(*args)
    got = triton_ops.tree_verify_sample(*on_device(*args))
    assert_same_outputs(got, expected)
    assert got[1].tolist() == [1] and got[2].tolist() == [1]


def test_sample_inverse_cdf_falls_back_to_the_last_positive_token():
    """uniform_final = 1 puts the threshold at the full mass: no cumsum exceeds it, so the
    bonus is the last token with p > 0 (here 1, not the zero-probability tail)."""
    target_probs = torch.tensor([[[0.5, 0.25, 0.0, 0.0]]])
    draft_probs = torch.zeros_like(target_probs)
    args = (torch.tensor([[2]]), target_probs, draft_probs, torch.tensor([[-1]]), torch.tensor([[-1]]),
            torch.tensor([[0.0]]), torch.tensor([1.0]))
    expected = reference.tree_verify_sample(*args)
    got = triton_ops.tree_verify_sample(*on_device(*args))
    assert_same_outputs(got, expected)
    assert got[2].tolist() == [1]
