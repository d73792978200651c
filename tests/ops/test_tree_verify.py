"""tree_verify_greedy / tree_verify_sample: hand-built trees with known answers, every
backend equal to the reference on random trees (same uniforms -> same path), and a
statistical test that sampled verification emits tokens distributed as the target."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparrow_kernels import ops
from sparrow_kernels.ops import reference
from tests.ops.helpers import poisoned_outputs, random_parents, tree_links


def tree_tensors(parents_per_row: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """next_token, next_sibling [B, N] for one parent list per row (same N)."""
    links = [tree_links(p) for p in parents_per_row]
    next_token = torch.tensor([fc for fc, _ in links], dtype=torch.int64, device=device)    # [B, N]
    next_sibling = torch.tensor([ns for _, ns in links], dtype=torch.int64, device=device)  # [B, N]
    return next_token, next_sibling


def links_from_children(children_per_row: list[dict[int, list[int]]], N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """next_token, next_sibling [B, N] from explicit {node: [children in sibling order]}."""
    next_token = torch.full((len(children_per_row), N), -1, dtype=torch.int64)
    next_sibling = torch.full((len(children_per_row), N), -1, dtype=torch.int64)
    for b, children in enumerate(children_per_row):
        for node, kids in children.items():
            next_token[b, node] = kids[0]
            for left, right in zip(kids, kids[1:]):
                next_sibling[b, left] = right
    return next_token, next_sibling


def as_lists(outputs) -> tuple[list, list, list]:
    accept_index, accept_len, bonus = outputs
    return accept_index.tolist(), accept_len.tolist(), bonus.tolist()


# ----------------------------------------------------------------------------- greedy, by hand
def test_greedy_hand_built_trees(backend):
    """Five trees of N = 5 in one batch (nodes a tree does not link are unreachable):
    row 0 root only; row 1 a chain accepted up to a mismatch; row 2 siblings where only the
    second matches, then its child; row 3 a fully accepted chain (bonus after the leaf);
    row 4 a root whose children all mismatch."""
    chain = {0: [1], 1: [2], 2: [3], 3: [4]}
    trees = [{}, chain, {0: [1, 2, 3], 2: [4]}, chain, {0: [1, 2], 1: [3, 4]}]
    next_token, next_sibling = links_from_children(trees, 5)
    candidates = torch.tensor([[9, 1, 2, 3, 4],
                               [9, 5, 6, 7, 8],
                               [9, 4, 5, 6, 8],
                               [9, 1, 2, 3, 4],
                               [9, 1, 2, 3, 4]])
    target_predict = torch.tensor([[3, 0, 0, 0, 0],
                                   [5, 6, 9, 1, 1],               # 5, 6 match; node 2 predicts 9 != 7
                                   [5, 0, 8, 0, 11],              # node 2 (token 5) matches, then node 4
                                   [1, 2, 3, 4, 42],              # every node matches; bonus 42
                                   [7, 0, 0, 0, 0]])              # no child has token 7
    dev = backend.device
    with poisoned_outputs(dev), backend.use():
        got = as_lists(ops.tree_verify_greedy(candidates.to(dev), target_predict.to(dev), next_token.to(dev),
                                              next_sibling.to(dev)))
    assert got == ([[0, -1, -1, -1, -1], [0, 1, 2, -1, -1], [0, 2, 4, -1, -1], [0, 1, 2, 3, 4], [0, -1, -1, -1, -1]],
                   [1, 3, 3, 5, 1],
                   [3, 9, 11, 42, 7])
    assert got == as_lists(reference.tree_verify_greedy(candidates, target_predict, next_token, next_sibling))


@st.composite
def greedy_cases(draw, small=False):
    B = draw(st.integers(1, 3 if small else 5))
    N = draw(st.integers(1, 8 if small else 16))
    V = draw(st.integers(2, 5))  # few tokens, so that many children match
    return B, N, V, draw(st.integers(0, 2**31 - 1))


def make_greedy_inputs(case, device):
    B, N, V, seed = case
    gen = torch.Generator().manual_seed(seed)
    parents = [random_parents(N, gen) for _ in range(B)]
    next_token, next_sibling = tree_tensors(parents, device)
    candidates = torch.randint(0, V, (B, N), generator=gen)                     # [B, N]
    target_predict = torch.randint(0, V, (B, N), generator=gen)                 # [B, N]
    return candidates.to(device), target_predict.to(device), next_token, next_sibling


def test_greedy_matches_reference(backend):
    @settings(max_examples=backend.examples(60), database=None)
    @given(case=greedy_cases(small=backend.interpreted))
    def check(case):
        inputs = make_greedy_inputs(case, backend.device)
        expected = as_lists(reference.tree_verify_greedy(*(t.cpu() for t in inputs)))
        with poisoned_outputs(backend.device), backend.use():
            outputs = ops.tree_verify_greedy(*inputs)
        assert all(t.dtype == torch.int64 and t.device == inputs[0].device for t in outputs)
        assert as_lists(outputs) == expected

    check()


# ----------------------------------------------------------------------------- sampling, by hand
def test_sample_hand_built_trees(backend):
    """V = 4, N = 3; rows:
    0 root only: bonus = inverse CDF of [.1 .2 .3 .4] at u = .35 -> token 2.
    1 target-only chain with one-hot targets on the children's tokens: full acceptance, then
      the bonus from node 2's uniform target at u = .6 -> token 2.
    2 target-only siblings: token 0 has target prob 0 (rejected), token 1 accepted (u*S = .4 < .5);
      node 2's target is one-hot at 3 -> bonus 3.
    3 target-only: the only child (token 0) rejected at u = .9 > .5; the residual drops token 0,
      so even u_final = 0 gives bonus 1.
    4 draft probs known: child token 0 rejected (u q S = .25 >= p Q = .2), residual
      max(p - q, 0) = [0 0 .5 0]; child token 1 rejected (p = 0); bonus from [0 0 1 0] -> 2.
    5 draft probs equal the target at the root: the child is accepted whatever u < 1."""
    f = torch.tensor
    uniform_t = [0.25] * 4
    zeros = [0.0] * 4
    target = f([[[.1, .2, .3, .4], zeros, zeros],
                [[0, 0, 1., 0], [0, 0, 0, 1.], uniform_t],
                [[0, .5, .5, 0], zeros, [0, 0, 0, 1.]],
                [[.5, .5, 0, 0], zeros, zeros],
                [[.2, .3, .5, 0], zeros, zeros],
                [[.2, .3, .5, 0], [0, 1., 0, 0], zeros]])
    draft = torch.zeros(6, 3, 4)
    draft[4, 0] = f([.5, .5, 0, 0])
    draft[5, 0] = f([.2, .3, .5, 0])
    candidates = f([[0, 0, 0], [0, 2, 3], [0, 0, 1], [0, 0, 0], [0, 0, 1], [0, 2, 0]])
    next_token, next_sibling = links_from_children(
        [{}, {0: [1], 1: [2]}, {0: [1, 2]}, {0: [1]}, {0: [1, 2]}, {0: [1]}], 3)
    uniform_accept = f([[0., 0., 0.], [0., .99, .99], [0., .3, .4], [0., .9, 0.], [0., .5, .01], [0., .999, 0.]])
    uniform_final = f([.35, .6, .5, 0., .7, .5])
    inputs = (candidates, target, draft, next_token, next_sibling, uniform_accept, uniform_final)
    expected = ([[0, -1, -1], [0, 1, 2], [0, 2, -1], [0, -1, -1], [0, -1, -1], [0, 1, -1]],
                [1, 3, 2, 1, 1, 2],
                [2, 2, 3, 1, 2, 1])
    assert as_lists(reference.tree_verify_sample(*inputs)) == expected
    dev = backend.device
    with poisoned_outputs(dev), backend.use():
        assert as_lists(ops.tree_verify_sample(*(t.to(dev) for t in inputs))) == expected


# ----------------------------------------------------------------------------- sampling vs reference
def random_distributions(shape, V, gen, sparsity: float) -> torch.Tensor:
    """Normalised rows [..., V] with about `sparsity` of the entries exactly 0 (as after top-p)."""
    weights = torch.exp(2 * torch.randn(*shape, V, generator=gen))
    weights = weights * (torch.rand(*shape, V, generator=gen) >= sparsity)
    weights[..., 0] += (weights.sum(-1) == 0).float()  # never an all-zero row
    return weights / weights.sum(-1, keepdim=True)


@st.composite
def sample_cases(draw, small=False):
    B = draw(st.integers(1, 3 if small else 5))
    N = draw(st.integers(1, 8 if small else 16))
    V = draw(st.sampled_from((2, 3, 7, 33) if small else (2, 3, 7, 33, 300)))
    draft_mode = draw(st.sampled_from(["known", "unknown", "mixed"]))
    return B, N, V, draft_mode, draw(st.floats(0, 0.7)), draw(st.integers(0, 2**31 - 1))


def make_sample_inputs(case, device):
    """Children drawn i.i.d. from draft_probs[parent] when it is known; arbitrary tokens when
    it is all zero ("unknown"), as EAGLE-2's top-k trees."""
    B, N, V, draft_mode, sparsity, seed = case
    gen = torch.Generator().manual_seed(seed)
    parents = [random_parents(N, gen) for _ in range(B)]
    next_token, next_sibling = tree_tensors(parents, device)
    target = random_distributions((B, N), V, gen, sparsity)                     # [B, N, V]
    draft = random_distributions((B, N), V, gen, sparsity)                      # [B, N, V]
    known = {"known": torch.ones(B, N, dtype=torch.bool), "unknown": torch.zeros(B, N, dtype=torch.bool),
             "mixed": torch.rand(B, N, generator=gen) < 0.5}[draft_mode]
    draft = draft * known[:, :, None]
    candidates = torch.randint(0, V, (B, N), generator=gen)                     # [B, N]
    for b in range(B):
        for i in range(1, N):
            p = parents[b][i]
            if known[b, p]:
                candidates[b, i] = int(torch.multinomial(draft[b, p], 1, generator=gen))
    uniform_accept = torch.rand(B, N, generator=gen)                            # [B, N]
    uniform_final = torch.rand(B, generator=gen)                                # [B]
    return tuple(t.to(device) for t in (candidates, target, draft, next_token, next_sibling, uniform_accept,
                                         uniform_final))


def test_sample_matches_reference(backend):
    @settings(max_examples=backend.examples(60), database=None)
    @given(case=sample_cases(small=backend.interpreted))
    def check(case):
        inputs = make_sample_inputs(case, backend.device)
        expected = as_lists(reference.tree_verify_sample(*(t.cpu() for t in inputs)))
        with poisoned_outputs(backend.device), backend.use():
            outputs = ops.tree_verify_sample(*inputs)
        assert all(t.dtype == torch.int64 and t.device == inputs[0].device for t in outputs)
        assert as_lists(outputs) == expected

    check()


# ----------------------------------------------------------------------------- losslessness
V_STAT = 6
N_DRAWS = 8000


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Upper-tail p-value of Pearson's chi-square for observed counts vs cell probabilities."""
    expected = probs * counts.sum()
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor((probs > 0).sum().item() - 1, dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, stat / 2))


class TwoTokenWorld:
    """A target over two tokens, p(x1) p(x2 | x1), and a different draft q(x1) q(x2 | x1).
    Each draw verifies a depth-2 tree (2 children per node) and reads off the first two
    emitted tokens; if the step emits only one, the second is sampled from the target, as
    the next step would (losslessness of one step is what the first-token test checks)."""

    def __init__(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.p1 = torch.softmax(0.7 * torch.randn(V_STAT, generator=gen, dtype=torch.float64), 0)
        self.p2 = torch.softmax(0.7 * torch.randn(V_STAT, V_STAT, generator=gen, dtype=torch.float64), 1)
        self.q1 = torch.softmax(1.5 * torch.randn(V_STAT, generator=gen, dtype=torch.float64), 0)
        self.q2 = torch.softmax(1.5 * torch.randn(V_STAT, V_STAT, generator=gen, dtype=torch.float64), 1)
        self.parents = [-1, 0, 0, 1, 1, 2, 2]

    def draw_trees(self, n: int, draft_known: bool, gen: torch.Generator):
        N = len(self.parents)
        cand = torch.zeros(n, N, dtype=torch.int64)                            # [n, N]
        if draft_known:   # children i.i.d. from the draft
            cand[:, 1:3] = torch.multinomial(self.q1.float(), 2 * n, replacement=True, generator=gen).view(n, 2)
            for child, parent in ((3, 1), (5, 2)):
                rows = self.q2[cand[:, parent]].float()                           # [n, V]
                cand[:, child:child + 2] = torch.multinomial(rows, 2, replacement=True, generator=gen)
        else:             # deterministic: the draft's top-2 tokens
            cand[:, 1:3] = torch.topk(self.q1, 2).indices
            for child, parent in ((3, 1), (5, 2)):
                cand[:, child:child + 2] = torch.topk(self.q2[cand[:, parent]], 2, dim=-1).indices
        target = torch.zeros(n, N, V_STAT)                                      # [n, N, V]
        target[:, 0] = self.p1.float()
        target[:, 1:] = self.p2[cand[:, 1:]].float()   # deeper nodes: any distribution will do
        draft = torch.zeros(n, N, V_STAT)                                       # [n, N, V]
        if draft_known:
            draft[:, 0] = self.q1.float()
            draft[:, 1:3] = self.q2[cand[:, 1:3]].float()
        next_token, next_sibling = tree_tensors([self.parents] * n, "cpu")
        uniform_accept, uniform_final = torch.rand(n, N, generator=gen), torch.rand(n, generator=gen)
        return cand, target, draft, next_token, next_sibling, uniform_accept, uniform_final

    def first_two_tokens(self, inputs, outputs, gen) -> tuple[torch.Tensor, torch.Tensor]:
        cand = inputs[0]
        accept_index, accept_len, bonus = outputs
        n = cand.shape[0]
        path_token = torch.gather(cand, 1, accept_index.clamp(min=0))           # [n, N]
        x1 = torch.where(accept_len >= 2, path_token[:, 1], bonus)
        next_step = torch.multinomial(self.p2[x1].float(), 1, generator=gen)[:, 0]
        x2 = torch.where(accept_len >= 3, path_token[:, 2], torch.where(accept_len == 2, bonus, next_step))
        assert x1.shape == (n,) and x2.shape == (n,)
        return x1, x2

    def p_values(self, draft_known: bool, seed: int, n_draws: int = N_DRAWS,
                 corrupt_draft: bool = False) -> tuple[float, float]:
        gen = torch.Generator().manual_seed(seed)
        inputs = self.draw_trees(n_draws, draft_known, gen)
        if corrupt_draft:  # verify with a draft distribution other than the one the children came from
            inputs = inputs[:2] + (torch.where(inputs[2] > 0, 1.0 / V_STAT, 0.0),) + inputs[3:]
        x1, x2 = self.first_two_tokens(inputs, reference.tree_verify_sample(*inputs), gen)
        first = torch.bincount(x1, minlength=V_STAT).double()
        joint = torch.bincount(x1 * V_STAT + x2, minlength=V_STAT**2).double()
        return (chi_square_p_value(first, self.p1),
                chi_square_p_value(joint, (self.p1[:, None] * self.p2).flatten()))


@pytest.mark.parametrize("draft_known", [True, False], ids=["with_draft_probs", "target_only"])
def test_sampled_verification_is_lossless(draft_known):
    """Chi-square of the first emitted token and of the first two (36 cells) against the
    target, over 8k verified trees (fixed seeds, so the outcome is reproducible)."""
    p_first, p_joint = TwoTokenWorld().p_values(draft_known, seed=1234)
    assert p_first > 1e-3, f"first token not distributed as the target (chi-square p = {p_first:.2g})"
    assert p_joint > 1e-3, f"first two tokens not distributed as the target (chi-square p = {p_joint:.2g})"


def test_lossless_check_detects_a_wrong_acceptance_rule():
    """The same check rejects verification with the wrong draft probabilities."""
    p_first, p_joint = TwoTokenWorld().p_values(True, seed=1234, n_draws=2000, corrupt_draft=True)
    assert min(p_first, p_joint) < 1e-6, f"a biased sampler passed (p = {p_first:.2g}, {p_joint:.2g})"
