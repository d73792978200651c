"""Tests of sampling in sparrow_kernels/speculative/engine.py: the temperature/top-p distribution equals
transformers' own warpers, plain sampling draws with the verify op's inverse-CDF rule, and
the first generated tokens under speculative sampling (target-only top-k trees, sampled
trees with draft probabilities, chains, top-p) follow the exact distribution of the target
(chi-square), like plain sampling does, while a wrong temperature is detected.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparrow_kernels import ops
from sparrow_kernels.speculative.engine import (SparrowGenerator, autoregressive_generate, sample_from_probs,
                                                sampling_probs)
from sparrow_kernels.speculative.tree import TreeShape
from sparrow_kernels.targets.base import VideoPrompt
from tests.speculative.helpers import random_draft, tiny_vlm

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- the distribution
@settings(max_examples=60, deadline=None)
@given(vocab=st.integers(2, 60), temperature=st.floats(0.2, 3.0), top_p=st.floats(0.05, 1.0),
       seed=st.integers(0, 2**31 - 1))
def test_sampling_probs_equal_transformers_warpers(vocab, temperature, top_p, seed):
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    expected = warpers(torch.zeros(3, 1, dtype=torch.long), logits.clone()).softmax(-1)
    torch.testing.assert_close(sampling_probs(logits, temperature, top_p), expected, rtol=1e-5, atol=1e-7)


def test_sampling_probs_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        sampling_probs(torch.zeros(4), 0.0)
    with pytest.raises(ValueError, match="top_p"):
        sampling_probs(torch.zeros(4), 1.0, top_p=1.5)


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 4), vocab=st.integers(1, 40), zeros=st.floats(0, 0.8), seed=st.integers(0, 2**31 - 1),
       edge=st.sampled_from([None, 0.0, 1.0 - 2**-24]))
def test_plain_draw_uses_the_verify_ops_inverse_cdf(batch, vocab, zeros, seed, edge):
    """sample_from_probs(probs, u) = the bonus token tree_verify_sample draws for a root-only
    tree with the same uniform, so plain and speculative sampling share one rule."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.rand(batch, vocab, generator=gen)
    probs[torch.rand(batch, vocab, generator=gen) < zeros] = 0
    probs[:, int(torch.randint(0, vocab, (1,), generator=gen))] += 0.1           # some mass in every row
    probs = probs / probs.sum(-1, keepdim=True)
    uniform = torch.rand(batch, generator=gen) if edge is None else torch.full((batch,), edge)
    none = torch.full((batch, 1), -1, dtype=torch.int64)
    _, _, bonus = ops.tree_verify_sample(torch.zeros(batch, 1, dtype=torch.int64), probs[:, None].contiguous(),
                                         torch.zeros(batch, 1, vocab), none, none, torch.rand(batch, 1, generator=gen),
                                         uniform)
    drawn = sample_from_probs(probs, uniform)
    assert drawn.tolist() == bonus.tolist()
    assert bool((probs.gather(1, drawn[:, None]) > 0).all())


# ----------------------------------------------------------------------------- lossless sampling
VOCAB, FIRST_K, ROWS, CALLS = 5, 3, 320, 3


@pytest.fixture(scope="module")
def setup():
    target = tiny_vlm(seed=0, vocab_size=VOCAB, init_std=0.25)
    gen = torch.Generator().manual_seed(0)
    prompt = VideoPrompt(frames=torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8, generator=gen),
                         prompt_ids=torch.tensor([1, 4, 3, 4]))
    return target, prompt, random_draft(target, seed=2)


def _exact_joint(target, prompt: VideoPrompt, temperature: float, top_p: float) -> dict[tuple, float]:
    """P(first FIRST_K tokens) of plain sampling, by enumerating every prefix."""
    joint = {(): 1.0}
    for _ in range(FIRST_K):
        prefixes = list(joint)
        batch = [VideoPrompt(frames=prompt.frames,
                             prompt_ids=torch.cat([prompt.prompt_ids, torch.tensor(p, dtype=torch.long)]))
                 for p in prefixes]
        probs = sampling_probs(target.prefill(batch, [], 64).logits, temperature, top_p).double()   # [n, V]
        joint = {p + (v,): joint[p] * float(probs[i, v]) for i, p in enumerate(prefixes) for v in range(VOCAB)}
    return joint


def _chi_square_p_value(samples: list[tuple], exact: dict[tuple, float]) -> float:
    """Pearson chi-square of the sample counts against `exact`, cells with an expected count
    below 5 pooled into one."""
    n = len(samples)
    counts = {cell: 0 for cell in exact}
    for s in samples:
        counts[s] += 1
    big = [c for c in exact if exact[c] * n >= 5]
    observed = [counts[c] for c in big] + [n - sum(counts[c] for c in big)]
    expected = [exact[c] * n for c in big] + [n - sum(exact[c] * n for c in big)]
    if expected[-1] < 1e-9:
        observed, expected = observed[:-1], expected[:-1]
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    df = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _samples(run) -> list[tuple]:
    out = []
    for seed in range(CALLS):
        result = run(seed)
        assert all(len(t) == FIRST_K for t in result.tokens)
        out += [tuple(t) for t in result.tokens]
    return out


CASES = {   # tree shape, draft_sampling, sampling settings
    "tree_target_only": (TreeShape(30, 3, 8), False, dict(temperature=1.0, top_p=1.0)),
    "tree_with_draft_probs": (TreeShape(10, 2, 2), True, dict(temperature=1.0, top_p=1.0)),
    "chain_with_draft_probs_top_p": (TreeShape(5, 3, 1), True, dict(temperature=0.8, top_p=0.9)),
    "tree_target_only_top_p": (TreeShape(12, 2, 3), False, dict(temperature=0.8, top_p=0.9)),
}


@pytest.mark.parametrize("case", CASES)
def test_speculative_sampling_matches_the_target_distribution(setup, case):
    target, prompt, draft = setup
    tree, draft_sampling, sampling = CASES[case]
    exact = _exact_joint(target, prompt, **sampling)
    generator = SparrowGenerator(target, draft, tree, draft_sampling=draft_sampling)
    speculative = _samples(lambda seed: generator.generate([prompt] * ROWS, FIRST_K, eos_token_ids=[], seed=seed,
                                                           capacity=64, **sampling))
    assert _chi_square_p_value(speculative, exact) > 1e-3


def test_plain_sampling_matches_and_a_wrong_temperature_is_caught(setup):
    """The baseline follows the exact distribution, and the test has power: samples at
    temperature 1.3 are rejected against the temperature-1 distribution."""
    target, prompt, _ = setup
    exact = _exact_joint(target, prompt, 1.0, 1.0)
    plain = _samples(lambda seed: autoregressive_generate(target, [prompt] * ROWS, FIRST_K, temperature=1.0,
                                                          eos_token_ids=[], seed=seed, capacity=64))
    assert _chi_square_p_value(plain, exact) > 1e-3
    hotter = _samples(lambda seed: autoregressive_generate(target, [prompt] * ROWS, FIRST_K, temperature=1.3,
                                                           eos_token_ids=[], seed=seed, capacity=64))
    assert _chi_square_p_value(hotter, exact) < 1e-3


def test_sampling_is_reproducible_with_a_seed(setup):
    target, prompt, draft = setup
    gen = SparrowGenerator(target, draft, TreeShape(10, 2, 2), draft_sampling=True)
    a = gen.generate([prompt] * 4, 6, temperature=1.0, seed=123, eos_token_ids=[], capacity=64)
    b = gen.generate([prompt] * 4, 6, temperature=1.0, seed=123, eos_token_ids=[], capacity=64)
    assert a.tokens == b.tokens
    rows = {tuple(t) for t in a.tokens + gen.generate([prompt] * 4, 6, temperature=1.0, seed=7, eos_token_ids=[],
                                                      capacity=64).tokens}
    assert len(rows) > 1                                                        # different rows / seeds differ


def test_every_token_sequence_is_reachable(setup):
    """Sanity of the sample sizes: the most likely cells of the exact joint actually occur."""
    target, prompt, _ = setup
    exact = _exact_joint(target, prompt, 1.0, 1.0)
    assert sum(exact.values()) == pytest.approx(1.0, abs=1e-6)
    assert len(list(itertools.islice((c for c, p in exact.items() if p * ROWS * CALLS >= 5), 12))) >= 12
