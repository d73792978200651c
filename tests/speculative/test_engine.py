"""Tests of sparrow_kernels/speculative/engine.py with greedy decoding: speculative output equals plain
greedy output token for token (tiny VLM, tiny HF Qwen2.5-VL / LLaVA-OneVision; chain and
tree drafting; batch 1 and 4; oracle and random drafts), the draft is fed the target's own
features with the EAGLE shift, stops (EOS, max_new_tokens, stop strings) cut chunks without
overshoot, capacity errors come before any tree forward, and streaming yields the same tokens.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparrow_kernels.speculative.engine import SparrowGenerator, autoregressive_generate, draft_prompt_entries
from sparrow_kernels.speculative.tree import TreeShape
from tests.speculative.helpers import (CharTokenizer, CountingTarget, RecordingDraft, oracle_for, prompt_length,
                                       prompt_length_any, random_draft, tiny_vlm, vlm_prompts)

torch.set_num_threads(1)

TREES = {"chain": TreeShape(total_tokens=5, depth=3, top_k=1),
         "tree": TreeShape(total_tokens=30, depth=3, top_k=8),
         "small_tree": TreeShape(total_tokens=8, depth=2, top_k=3)}


@pytest.fixture(scope="module")
def target():
    return tiny_vlm(seed=0, vocab_size=64)


def _capacity(target, prompts, max_new_tokens, nodes=30):
    return max(prompt_length_any(target, p) for p in prompts) + max_new_tokens + nodes


# ----------------------------------------------------------------------------- greedy equivalence
@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_random_draft_equals_plain_greedy(target, tree, batch):
    """Random draft (acceptance near zero) with the target's own EOS: every row identical to
    plain greedy decoding, both our baseline and the target's own generate_greedy."""
    prompts = vlm_prompts(target, batch, seed=batch * 10 + len(tree))
    max_new = 14
    draft = random_draft(target, seed=1)
    capacity = _capacity(target, prompts, max_new)
    spec = SparrowGenerator(target, draft, TREES[tree]).generate(prompts, max_new, capacity=capacity)
    plain = autoregressive_generate(target, prompts, max_new, capacity=capacity)
    assert spec.tokens == plain.tokens
    assert spec.tokens == target.generate_greedy(prompts, max_new, capacity=capacity)
    assert spec.finish_reasons == plain.finish_reasons
    assert spec.stats.emitted == [len(t) for t in spec.tokens]


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.sampled_from([1, 4]), tree=st.sampled_from(list(TREES)),
       visual_kv=st.booleans(), window=st.sampled_from([0, 4]))
def test_greedy_equivalence_random_prompts(target, seed, batch, tree, visual_kv, window):
    """Random prompts/videos, random drafts of both kinds (text-only and visual-KV, with or
    without a window), EOS disabled so rows run to max_new_tokens."""
    prompts = vlm_prompts(target, batch, seed=seed)
    max_new = 10
    draft = random_draft(target, seed=seed % 7, visual_kv=visual_kv, window=window, n_anchor=2 if window else 0)
    capacity = _capacity(target, prompts, max_new)
    spec = SparrowGenerator(target, draft, TREES[tree]).generate(prompts, max_new, eos_token_ids=[],
                                                                   capacity=capacity)
    plain = autoregressive_generate(target, prompts, max_new, eos_token_ids=[], capacity=capacity)
    assert spec.tokens == plain.tokens
    assert all(len(t) == max_new for t in spec.tokens)


@pytest.mark.parametrize("batch", [1, 4])
def test_oracle_draft_is_fully_accepted(target, batch):
    """A draft that proposes the target's own greedy tokens: every step accepts depth + 1
    drafted tokens + the bonus (tau = depth + 2), and the output is still exact."""
    prompts = vlm_prompts(target, batch, seed=7)
    max_new = 21
    oracle = oracle_for(target, prompts, max_new)
    settings_ = TREES["tree"]
    capacity = _capacity(target, prompts, max_new)
    spec = SparrowGenerator(target, oracle, settings_).generate(prompts, max_new, eos_token_ids=[],
                                                                  capacity=capacity)
    assert spec.tokens == [c[:max_new] for c in oracle.continuations]
    full = settings_.depth + 2
    assert spec.stats.steps == (max_new - 1 + full - 1) // full
    assert all(n == full for row in spec.stats.accept_lengths for n in row)
    assert spec.stats.tau == full
    assert spec.stats.accepted_per_row == [(full - 1) * spec.stats.steps] * batch


def test_tree_finds_the_true_token_on_a_later_sibling(target):
    """When the draft ranks the true token second every 3rd position, chain drafting stops
    there while a top-2 tree accepts it on the second sibling: higher tau, same tokens."""
    prompts = vlm_prompts(target, 2, seed=9)
    max_new = 24
    oracle = oracle_for(target, prompts, max_new, second_every=3)
    capacity = _capacity(target, prompts, max_new)
    chain = SparrowGenerator(target, oracle, TreeShape(6, 4, 1)).generate(
        prompts, max_new, eos_token_ids=[], capacity=capacity)
    tree = SparrowGenerator(target, oracle, TreeShape(16, 4, 2)).generate(
        prompts, max_new, eos_token_ids=[], capacity=capacity)
    truth = [c[:max_new] for c in oracle.continuations]
    assert chain.tokens == truth and tree.tokens == truth
    assert tree.stats.tau > chain.stats.tau + 1
    assert tree.stats.tau == 6                                                      # depth + 2: nothing missed


# ----------------------------------------------------------------------------- draft inputs
@pytest.mark.parametrize("visual_kv", [False, True])
def test_draft_gets_target_features_with_eagle_shift(target, visual_kv):
    """Concatenating every extend call of a row gives exactly the pairs (target feature at a
    kept position, token at the next kept position) over the prompt's text positions (all
    positions for the visual-KV baseline; always the last prompt position) followed by every
    committed generated position, with the features the target computes for the final sequence."""
    prompts = vlm_prompts(target, 3, seed=21)
    max_new = 12
    layers = (1, target.num_layers)
    draft = RecordingDraft(random_draft(target, seed=2, feature_layers=layers, visual_kv=visual_kv))
    capacity = _capacity(target, prompts, max_new)
    out = SparrowGenerator(target, draft, TreeShape(8, 2, 3)).generate(
        prompts, max_new, eos_token_ids=[], capacity=capacity)
    H = target.hidden_size
    for b, prompt in enumerate(prompts):
        tokens = torch.cat([tokens[b, :int(valid[b])] for tokens, _, valid in draft.extends])
        features = torch.cat([feats[b, :int(valid[b])] for _, feats, valid in draft.extends])
        generated = out.tokens[b]
        full_ids = torch.cat([prompt.prompt_ids, torch.tensor(generated[:-1])])
        redo = target.prefill([type(prompt)(frames=prompt.frames, prompt_ids=full_ids)], layers, capacity)
        L = prompt_length(target, prompt)
        sequence = redo.input_ids[0].tolist() + [generated[-1]]                  # prompt + every generated token
        text = redo.text_mask[0].tolist()
        positions = [t for t in range(L) if visual_kv or text[t] or t == L - 1]
        committed = len(tokens) - len(positions)                                   # generated entries
        assert max_new - TREES["tree"].depth - 2 <= committed <= max_new - 1
        positions += list(range(L, L + committed))
        following = positions[1:] + [L + committed]
        assert tokens.tolist() == [sequence[t] for t in following]
        expected = torch.cat([redo.hidden[0][0, positions], redo.hidden[1][0, positions]], dim=-1)
        assert features.shape == (len(positions), 2 * H)
        torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)


def test_draft_prompt_entries_layout():
    """Hand-made prefill outputs with text before, between and after video spans, and a row
    whose prompt ends on a visual position (always kept: it predicts the first token)."""
    text_mask = torch.tensor([[1, 0, 0, 1, 1, 0, 1, 0],
                              [0, 0, 1, 1, 0, 0, 0, 0],
                              [1, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    lengths = torch.tensor([8, 6, 3])
    input_ids = torch.arange(100, 124).view(3, 8)
    pre = SimpleNamespace(input_ids=input_ids, text_mask=text_mask & (torch.arange(8) < lengths[:, None]),
                          lengths=lengths)
    first = torch.tensor([11, 12, 13])
    kept = {False: [[0, 3, 4, 6, 7], [2, 3, 5], [0, 1, 2]], True: [list(range(8)), list(range(6)), [0, 1, 2]]}
    for visual_kv in (False, True):
        index, tokens, valid = draft_prompt_entries(pre, first, visual_kv)
        for b in range(3):
            want = kept[visual_kv][b]
            assert valid[b] == len(want) and index[b, :len(want)].tolist() == want
            assert bool((index[b, len(want):] == -1).all()) and bool((tokens[b, len(want):] == 0).all())
            assert tokens[b, :len(want)].tolist() == [int(input_ids[b, t]) for t in want[1:]] + [int(first[b])]


# ----------------------------------------------------------------------------- stops
def _mid_chunk_stop(oracle_tokens: list[int], full: int) -> int:
    """An index k >= 3 whose token does not occur earlier and which is not the last token of
    a fully accepted chunk (chunks: 1 token from prefill, then `full` per step)."""
    for k in range(3, len(oracle_tokens)):
        if oracle_tokens[k] not in oracle_tokens[:k] and (k - 1) % full != full - 1:
            return k
    pytest.fail("no suitable stop position in the continuation")


def test_eos_inside_an_accepted_chunk(target):
    prompts = vlm_prompts(target, 1, seed=3)
    max_new = 24
    oracle = oracle_for(target, prompts, max_new)
    cont = oracle.continuations[0]
    k = _mid_chunk_stop(cont[:max_new], TREES["tree"].depth + 2)
    capacity = _capacity(target, prompts, max_new)
    spec = SparrowGenerator(target, oracle, TREES["tree"]).generate(prompts, max_new, eos_token_ids=[cont[k]],
                                                                      capacity=capacity)
    plain = autoregressive_generate(target, prompts, max_new, eos_token_ids=[cont[k]], capacity=capacity)
    assert spec.tokens == plain.tokens == [cont[:k + 1]]
    assert spec.finish_reasons == ["eos"]
    accepted = 1 + sum(spec.stats.accept_lengths[0])
    assert accepted > k + 1                                                        # the last chunk was cut


def test_max_new_tokens_mid_chunk_and_batch_rows_finishing_apart(target):
    prompts = vlm_prompts(target, 3, seed=5)
    oracle = oracle_for(target, prompts, 30)
    capacity = _capacity(target, prompts, 30)
    for max_new in (1, 2, 8, 9):
        spec = SparrowGenerator(target, oracle, TREES["tree"]).generate(prompts, max_new, eos_token_ids=[],
                                                                          capacity=capacity)
        assert spec.tokens == [c[:max_new] for c in oracle.continuations]
        assert spec.finish_reasons == ["length"] * 3
    # rows stop at different steps (EOS = a different token per row): later steps emit nothing for them
    eos = [oracle.continuations[b][3 + 4 * b] for b in range(3)]
    spec = SparrowGenerator(target, oracle, TREES["small_tree"]).generate(prompts, 30, eos_token_ids=eos,
                                                                            capacity=capacity)
    plain = autoregressive_generate(target, prompts, 30, eos_token_ids=eos, capacity=capacity)
    assert spec.tokens == plain.tokens
    for b in range(3):
        assert spec.tokens[b][-1] in eos and not set(spec.tokens[b][:-1]) & set(eos)


def test_stop_strings(target):
    prompts = vlm_prompts(target, 2, seed=8)
    max_new = 20
    oracle = oracle_for(target, prompts, max_new)
    capacity = _capacity(target, prompts, max_new)
    cont = oracle.continuations[0]
    k = _mid_chunk_stop(cont[:max_new - 1], TREES["tree"].depth + 2)
    stops = [f"<{cont[k]}>", f"<{cont[k + 1]}>"]
    two_token_stop = f"<{cont[k]}><{cont[k + 1]}>"
    gen = SparrowGenerator(target, oracle, TREES["tree"], tokenizer=CharTokenizer())
    for stop in (stops[0], two_token_stop):
        spec = gen.generate(prompts, max_new, eos_token_ids=[], stop_strings=[stop], capacity=capacity)
        plain = autoregressive_generate(target, prompts, max_new, eos_token_ids=[], stop_strings=[stop],
                                        capacity=capacity, tokenizer=CharTokenizer())
        assert spec.tokens == plain.tokens
        end = k + 1 if stop == stops[0] else k + 2
        assert spec.tokens[0] == cont[:end] and spec.finish_reasons[0] == "stop_string"
        assert stop in spec.text[0] and spec.text[0].endswith(stop)
    with pytest.raises(ValueError, match="stop_strings"):
        SparrowGenerator(target, oracle).generate(prompts, 4, stop_strings=["x"], capacity=capacity)


# ----------------------------------------------------------------------------- capacity
def test_capacity_errors_before_anything_is_written(target):
    prompts = vlm_prompts(target, 2, seed=2)
    L = max(prompt_length(target, p) for p in prompts)
    draft = random_draft(target)
    counting = CountingTarget(target)
    with pytest.raises(ValueError, match="capacity"):                             # prompt fills the cache
        SparrowGenerator(counting, draft).generate(prompts, 5, capacity=L)
    with pytest.raises(ValueError, match="capacity=.* too small"):                # no room for the generation
        SparrowGenerator(counting, draft, TREES["tree"]).generate(prompts, 20, capacity=L + 25)
    with pytest.raises(ValueError, match="capacity=.* too small"):
        autoregressive_generate(counting, prompts, 20, capacity=L + 5)
    assert counting.forward_calls == 0 and counting.commit_calls == 0
    # exactly enough room works: prompt + max_new_tokens - 2 + tree nodes
    nodes = SparrowGenerator(target, draft, TREES["tree"]).tree_nodes()[0]
    out = SparrowGenerator(target, draft, TREES["tree"]).generate(prompts, 6, eos_token_ids=[],
                                                                    capacity=L + 6 - 2 + nodes)
    assert out.tokens == autoregressive_generate(target, prompts, 6, eos_token_ids=[], capacity=L + 5).tokens


def test_capacity_defaults_to_the_exact_prompt_lengths(target):
    """Without capacity=, a target that counts its prompts gets a cache sized to them, so a
    prompt longer than max_context still runs (and equals plain greedy decoding)."""
    prompts = vlm_prompts(target, 2, seed=3)
    lengths = target.prompt_lengths(prompts)
    assert lengths == [prompt_length(target, p) for p in prompts]
    assert lengths == target.prefill(prompts, [], max(lengths) + 1).lengths.tolist()
    draft = random_draft(target)
    short = SparrowGenerator(target, draft, TREES["small_tree"], max_context=4)
    got = short.generate(prompts, 6, eos_token_ids=[])
    assert got.tokens == autoregressive_generate(target, prompts, 6, eos_token_ids=[], max_context=4).tokens


# ----------------------------------------------------------------------------- streaming, stats, errors
def test_stream_yields_the_generate_tokens_step_by_step(target):
    prompts = vlm_prompts(target, 3, seed=12)
    max_new = 15
    counting = CountingTarget(target)
    draft = random_draft(target)
    gen = SparrowGenerator(counting, draft, TREES["small_tree"])
    capacity = _capacity(target, prompts, max_new)
    stream = gen.stream(prompts, max_new, capacity=capacity)
    first = next(stream)
    assert counting.forward_calls == 0                                            # before any verification
    assert [len(t) for t in first.tokens] == [1, 1, 1]
    rows = [list(t) for t in first.tokens]
    finished = first.finished
    chunks = 1
    for chunk in stream:
        chunks += 1
        assert all(f or not old for f, old in zip(chunk.finished, finished))     # finished stays finished
        for b, new in enumerate(chunk.tokens):
            assert not (finished[b] and new)
            rows[b] += new
        finished = chunk.finished
    assert all(finished)
    assert chunks == chunk.stats.steps + 1 == counting.forward_calls + 1
    assert rows == gen.generate(prompts, max_new, capacity=capacity).tokens


def test_stats_fields(target):
    prompts = vlm_prompts(target, 2, seed=13)
    capacity = _capacity(target, prompts, 10)
    spec = SparrowGenerator(target, random_draft(target)).generate(prompts, 10, eos_token_ids=[], capacity=capacity)
    plain = autoregressive_generate(target, prompts, 10, eos_token_ids=[], capacity=capacity)
    for stats in (spec.stats, plain.stats):
        parts = [stats.prefill_s, stats.draft_s, stats.verify_s, stats.bookkeeping_s]
        assert all(p >= 0 for p in parts) and stats.total_s == pytest.approx(sum(parts))
        assert stats.emitted == [10, 10]
        assert sum(len(row) for row in stats.accept_lengths) >= stats.steps
        assert set(stats.as_dict()) >= {"tau", "steps", "accepted_per_row", "prefill_s", "draft_s", "verify_s",
                                        "bookkeeping_s"}
    assert plain.stats.tau == 1.0 and plain.stats.steps == 9 and plain.stats.draft_s == 0
    assert spec.stats.draft_s > 0 and 1.0 <= spec.stats.tau <= 5
    # tau counts every active (row, step): emitted tokens = 1 (prefill) + sum of step yields, minus cuts
    for b in range(2):
        assert 1 + sum(spec.stats.accept_lengths[b]) >= 10


def test_bad_requests(target):
    draft = random_draft(target)
    prompts = vlm_prompts(target, 1, seed=0)
    gen = SparrowGenerator(target, draft)
    with pytest.raises(ValueError, match="prompts"):
        gen.generate([], 3)
    with pytest.raises(ValueError, match="temperature"):
        gen.generate(prompts, 3, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate(prompts, 3, temperature=1, top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate(prompts, -1)
    with pytest.raises(ValueError, match="total_tokens"):
        SparrowGenerator(target, draft, TreeShape(total_tokens=0))
    with pytest.raises(ValueError, match="tree must be a tree.TreeShape"):
        SparrowGenerator(target, draft, {"total_tokens": 12})
    other = random_draft(tiny_vlm(seed=0, vocab_size=32))
    with pytest.raises(ValueError, match="vocab_size"):
        SparrowGenerator(target, other)
    empty = gen.generate(prompts, 0)
    assert empty.tokens == [[]] and empty.stats.steps == 0


# ----------------------------------------------------------------------------- HF targets
def _hf_target(kind: str):
    if kind == "qwen":
        from sparrow_kernels.targets.hf_qwen import QwenVLTarget
        return QwenVLTarget.tiny_random(seed=0)
    from sparrow_kernels.targets.hf_llava import LlavaOneVisionTarget
    return LlavaOneVisionTarget.tiny_random(seed=0)


@pytest.mark.parametrize("kind", ["qwen", "llava"])
def test_greedy_equivalence_tiny_hf_targets(kind):
    """Stock transformers models: batch 1 equals the model's own generate(do_sample=False)
    (a short text suffix after the video included); batch 2 with different lengths equals
    plain decoding through the adapter; chain and tree; random draft and oracle draft."""
    from tests.targets.hf_cases import random_prompt, stock_generate

    target = _hf_target(kind)
    prompts = [random_prompt(target, frames=2, suffix=1, seed=1), random_prompt(target, frames=4, suffix=5, seed=2)]
    max_new = 10
    capacity = _capacity(target, prompts, max_new)
    draft = random_draft(target, seed=3)
    for tree in ("chain", "tree"):
        gen = SparrowGenerator(target, draft, TREES[tree])
        alone = gen.generate(prompts[:1], max_new, eos_token_ids=[], capacity=capacity)
        assert alone.tokens[0] == stock_generate(target, prompts[0], max_new, eos_token_id=None)
        both = gen.generate(prompts, max_new, eos_token_ids=[], capacity=capacity)
        assert both.tokens == autoregressive_generate(target, prompts, max_new, eos_token_ids=[],
                                                      capacity=capacity).tokens
    oracle = oracle_for(target, prompts, max_new)
    spec = SparrowGenerator(target, oracle, TREES["tree"]).generate(prompts, max_new, eos_token_ids=[],
                                                                      capacity=capacity)
    assert spec.tokens == [c[:max_new] for c in oracle.continuations]
    assert spec.stats.tau >= 4


# ----------------------------------------------------------------------------- trained checkpoint
def test_trained_tiny_vlm_and_draft_greedy_equivalence():
    from sparrow_kernels.targets.tinyvlm import DEFAULT_CHECKPOINT, TinyVLMTarget

    if not (DEFAULT_CHECKPOINT / "model.safetensors").is_file():
        pytest.skip(f"no trained tiny VLM checkpoint at {DEFAULT_CHECKPOINT} yet")
    from sparrow_kernels.speculative.draft import SparrowDraft, committed_draft_dir

    target = TinyVLMTarget.load()
    draft_dir = committed_draft_dir("sparrow")
    trained = os.path.isfile(os.path.join(draft_dir, "model.safetensors"))
    draft = SparrowDraft.load(draft_dir, target) if trained else random_draft(target)
    prompts = [target.world_prompt(seed=1000 + i, num_frames=4 + 3 * i) for i in range(3)]
    max_new = 24
    spec = SparrowGenerator(target, draft).generate(prompts, max_new)
    assert spec.tokens == autoregressive_generate(target, prompts, max_new).tokens
    if trained:
        assert spec.stats.tau > 1.5


@pytest.mark.parametrize("visual_kv", [False, True])
def test_compiled_cpu_draft_phase_drafts_the_same_trees(target, visual_kv, monkeypatch):
    """fast_draft=True (the compiled CPU draft phase, sparrow_kernels/speculative/cpu_draft.py) against
    fast_draft=False (the Python draft phase): the same tokens, the same per-step accept
    lengths (so the same trees were verified), the fast path really ran, and both equal plain
    greedy decoding."""
    from sparrow_kernels.speculative import cpu_draft

    calls = {"build_tree": 0, "extend": 0}
    for name in calls:
        real = getattr(cpu_draft.CompiledDraft, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(cpu_draft.CompiledDraft, name, spy)
    prompts = vlm_prompts(target, 3, seed=5)
    max_new = 16
    draft = random_draft(target, seed=3, visual_kv=visual_kv, window=0 if visual_kv else 4, n_anchor=0 if visual_kv else 2)
    capacity = _capacity(target, prompts, max_new)
    runs = {}
    for fast in (True, False):
        gen = SparrowGenerator(target, draft, TREES["small_tree"], fast_draft=fast)
        runs[fast] = gen.generate(prompts, max_new, eos_token_ids=[], capacity=capacity)
        if fast:
            assert calls["build_tree"] == runs[fast].stats.steps and calls["extend"] >= runs[fast].stats.steps - 1
            calls_after_fast = dict(calls)
    assert calls == calls_after_fast                        # fast_draft=False never took the fast path
    assert runs[True].tokens == runs[False].tokens
    assert runs[True].stats.accept_lengths == runs[False].stats.accept_lengths
    assert runs[True].tokens == autoregressive_generate(target, prompts, max_new, eos_token_ids=[],
                                                        capacity=capacity).tokens
