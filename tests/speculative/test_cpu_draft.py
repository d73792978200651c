"""The compiled CPU draft phase (sparrow_kernels/speculative/cpu_draft.py, csrc/draft_cpu.cpp) against
its spec, the Python draft (tree.build_tree over SparrowDraft.draft_step, SparrowDraft.extend):
the same trees and cache contents on random drafts, caches and tree shapes, the same engine
output, every draft it must decline (so runner.draft_runner picks the Python path) and every
bad input it must reject."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparrow_kernels.speculative import cpu_draft
from sparrow_kernels.speculative.runner import MixedRunner, PythonRunner, draft_runner
from sparrow_kernels.speculative.tree import TreeShape, build_tree

from .test_draft import V, make_draft, rand_inputs

TREE_FIELDS = ("tokens", "parents", "depth", "tree_mask", "next_token", "next_sibling")


def _filled_pair(draft, B, lengths, capacity, seed):
    """Two identical draft caches holding `lengths[b]` committed entries per row (Python extend)."""
    T = max(lengths)
    tokens, features = rand_inputs(B, T, draft.config.feature_size, seed)
    valid = torch.tensor(lengths)
    caches = []
    for _ in range(2):
        cache = draft.new_cache(B, capacity)
        cache.k.fill_(float("nan"))           # poison: unwritten slots must never be read
        cache.v.fill_(float("nan"))
        hidden = draft.extend(cache, tokens, features, valid)
        caches.append(cache)
    return caches, hidden[torch.arange(B), (valid - 1).clamp(min=0)]


def _assert_same_tree(a, b):
    for name in TREE_FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-4)
    assert b.draft_probs is None


@settings(deadline=None)
@given(B=st.integers(1, 3), lengths=st.lists(st.integers(1, 20), min_size=3, max_size=3),
       shape=st.sampled_from([(10, 3, 3), (30, 3, 8), (16, 5, 2), (8, 6, 1), (5, 1, 4), (40, 2, 6)]),
       window=st.sampled_from([0, 3, 8]), n_anchor=st.integers(0, 3), layers=st.sampled_from([(4,), (1, 2, 4)]),
       vocab=st.sampled_from([0, 8, 20]), seed=st.integers(0, 2 ** 16))
def test_tree_matches_python(B, lengths, shape, window, n_anchor, layers, vocab, seed):
    """Also with a draft vocabulary of `vocab` random target ids (0: the whole vocabulary)."""
    draft = make_draft(window=window, n_anchor=n_anchor, layers=layers, seed=seed % 7)
    if vocab:
        draft.set_draft_vocab(torch.randperm(V, generator=torch.Generator().manual_seed(seed))[:vocab])
    lengths = lengths[:B]
    with torch.inference_mode():
        assert cpu_draft.available(draft)
        (c_py, c_fast), root_hidden = _filled_pair(draft, B, lengths, capacity=80, seed=seed)
        root = torch.randint(0, V, (B,), generator=torch.Generator().manual_seed(seed))
        expect = build_tree(draft, c_py, root, root_hidden, TreeShape(*shape))
        got = cpu_draft.prepare(draft, TreeShape(*shape)).build_tree(c_fast, root, root_hidden)
    _assert_same_tree(expect, got)
    if vocab:
        assert bool(torch.isin(got.tokens[:, 1:], draft.draft_vocab).all())
    assert c_fast.scratch_len == c_py.scratch_len
    assert torch.equal(c_fast.scratch_pos, c_py.scratch_pos)
    assert torch.equal(c_fast.lengths, c_py.lengths)
    used = int((c_py.lengths + c_py.scratch_len).max())
    for b in range(B):                       # committed entries and every scratch node's K/V
        end = int(c_py.lengths[b]) + c_py.scratch_len
        torch.testing.assert_close(c_fast.k[b, :, :end], c_py.k[b, :, :end], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c_fast.v[b, :, :end], c_py.v[b, :, :end], rtol=1e-4, atol=1e-5)
    assert used <= c_py.capacity


@settings(deadline=None)
@given(B=st.integers(1, 3), start=st.lists(st.integers(1, 15), min_size=3, max_size=3), T=st.integers(1, 6),
       window=st.sampled_from([0, 2, 5]), n_anchor=st.integers(0, 2), layers=st.sampled_from([(4,), (1, 3)]),
       seed=st.integers(0, 2 ** 16))
def test_extend_matches_python(B, start, T, window, n_anchor, layers, seed):
    draft = make_draft(window=window, n_anchor=n_anchor, layers=layers, seed=seed % 5)
    g = torch.Generator().manual_seed(seed)
    valid = torch.randint(0, T + 1, (B,), generator=g)
    with torch.inference_mode():
        (c_py, c_fast), _ = _filled_pair(draft, B, start[:B], capacity=40, seed=seed)
        tokens, features = rand_inputs(B, T, draft.config.feature_size, seed + 1)
        expect = draft.extend(c_py, tokens, features, valid)
        out = cpu_draft.prepare(draft, TreeShape()).extend(c_fast, tokens, features, valid)
    assert torch.equal(c_fast.lengths, c_py.lengths)
    for b in range(B):
        n = int(valid[b])
        torch.testing.assert_close(out[b, :n], expect[b, :n], rtol=1e-4, atol=1e-4)
        assert bool((out[b, n:] == 0).all())                  # padding entries: zero, documented
        end = int(c_py.lengths[b])
        torch.testing.assert_close(c_fast.k[b, :, :end], c_py.k[b, :, :end], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c_fast.v[b, :, :end], c_py.v[b, :, :end], rtol=1e-4, atol=1e-5)
    assert c_fast.scratch_len == 0


def test_declines_what_it_does_not_cover(monkeypatch):
    draft, shape = make_draft(), TreeShape(8, 2, 2)
    with torch.no_grad():
        assert isinstance(cpu_draft.prepare(draft, shape), cpu_draft.CompiledDraft)
    # gradients on (training): never
    assert cpu_draft.prepare(draft, shape) is None
    with torch.inference_mode():
        # objects that only implement the draft API, and the opt-out switch
        assert cpu_draft.prepare(object(), shape) is None
        monkeypatch.setenv("SPARROW_CPU_DRAFT", "0")
        assert cpu_draft.prepare(draft, shape) is None
        monkeypatch.delenv("SPARROW_CPU_DRAFT")
        # non-fp32 drafts
        assert cpu_draft.prepare(make_draft().to(torch.bfloat16), shape) is None
        # an LM head that is not Sequential(RMSNorm, Linear)
        other = make_draft()
        other.frozen.lm_head = torch.nn.Linear(other.config.hidden_size, V, bias=False)
        assert cpu_draft.prepare(other, shape) is None


def test_runner_is_chosen_once_per_call():
    draft, shape = make_draft(), TreeShape(8, 2, 2)
    sampler = lambda logits: logits.softmax(-1)  # noqa: E731
    with torch.inference_mode():
        assert isinstance(draft_runner(draft, shape), cpu_draft.CompiledDraft)
        assert isinstance(draft_runner(draft, shape, compiled=False), PythonRunner)
        mixed = draft_runner(draft, shape, sampler=sampler)          # sampled trees grow in Python
        assert isinstance(mixed, MixedRunner) and mixed.python.sampler is sampler
        assert isinstance(draft_runner(make_draft().to(torch.bfloat16), shape), PythonRunner)


def test_long_extends_and_root_only_trees_take_the_python_code():
    draft = make_draft()
    with torch.inference_mode():
        (c_py, c_fast), root_hidden = _filled_pair(draft, 1, [5], capacity=cpu_draft.MAX_EXTEND_ENTRIES + 20, seed=0)
        fast = cpu_draft.prepare(draft, TreeShape(total_tokens=1))
        root = torch.tensor([3])
        assert fast.build_tree(c_fast, root, root_hidden).tokens.tolist() == [[3]]
        tokens, features = rand_inputs(1, cpu_draft.MAX_EXTEND_ENTRIES + 1, draft.config.feature_size)
        valid = torch.tensor([cpu_draft.MAX_EXTEND_ENTRIES + 1])
        expect = draft.extend(c_py, tokens, features, valid)
        got = fast.extend(c_fast, tokens, features, valid)
    assert torch.equal(got, expect)                       # the very same code ran
    assert torch.equal(c_fast.lengths, c_py.lengths)


def test_bad_inputs_name_the_argument():
    draft = make_draft()
    with torch.inference_mode():
        (cache, _), root_hidden = _filled_pair(draft, 1, [5], capacity=40, seed=0)
        fast = cpu_draft.prepare(draft, TreeShape(8, 2, 2))
        tokens, features = rand_inputs(1, 2, draft.config.feature_size)
        with pytest.raises(ValueError, match="root_hidden must have shape"):
            fast.build_tree(cache, torch.tensor([3]), root_hidden[:, :5])
        with pytest.raises(ValueError, match="root_tokens must be a torch.int64"):
            fast.build_tree(cache, torch.tensor([3], dtype=torch.int32), root_hidden)
        with pytest.raises(ValueError, match="valid must have shape"):
            fast.extend(cache, tokens, features, torch.tensor([2, 2]))
        with pytest.raises(ValueError, match="cache must be a DraftCache of batch 2"):
            fast.extend(draft.new_cache(1, 8), torch.cat([tokens, tokens]), torch.cat([features, features]),
                        torch.tensor([2, 2]))


def test_capacity_overflow_is_an_error_and_leaves_the_cache():
    draft = make_draft()
    with torch.inference_mode():
        (cache, _), root_hidden = _filled_pair(draft, 2, [5, 9], capacity=12, seed=0)
        before_k, before_len = cache.k.clone(), cache.lengths.clone()
        with pytest.raises(ValueError, match="capacity 12"):
            cpu_draft.prepare(draft, TreeShape(30, 3, 8)).build_tree(cache, torch.tensor([1, 2]), root_hidden)
        tokens, features = rand_inputs(2, 4, draft.config.feature_size)
        with pytest.raises(ValueError, match="row 1 needs 13 draft cache slots"):
            cpu_draft.prepare(draft, TreeShape()).extend(cache, tokens, features, torch.tensor([1, 4]))
    assert torch.equal(cache.lengths, before_len)
    assert torch.equal(cache.k.nan_to_num(), before_k.nan_to_num())


@pytest.mark.parametrize("module,cls", [("qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLRMSNorm"),
                                        ("qwen2_vl.modeling_qwen2_vl", "Qwen2VLRMSNorm"),
                                        ("qwen2.modeling_qwen2", "Qwen2RMSNorm")])
def test_stock_hf_heads_take_the_compiled_path(module, cls):
    """The final norms of the stock Qwen2.5-VL / Qwen2-VL / Qwen2 (LLaVA-OneVision's LM) heads compute
    x / rms(x) * weight: the compiled draft phase covers them and builds the Python path's tree."""
    import importlib

    norm_cls = getattr(importlib.import_module(f"transformers.models.{module}"), cls)
    draft = make_draft(seed=3)
    linear = draft.frozen.lm_head[-1] if isinstance(draft.frozen.lm_head, torch.nn.Sequential) else None
    assert linear is not None
    norm = norm_cls(linear.in_features, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    draft.frozen.lm_head = torch.nn.Sequential(norm, linear)
    with torch.inference_mode():
        assert cpu_draft.available(draft)
        (c_py, c_fast), root_hidden = _filled_pair(draft, 2, [5, 9], capacity=60, seed=1)
        root = torch.tensor([3, 7])
        expect = build_tree(draft, c_py, root, root_hidden, TreeShape(12, 5, 2))
        got = cpu_draft.prepare(draft, TreeShape(12, 5, 2)).build_tree(c_fast, root, root_hidden)
    _assert_same_tree(expect, got)


def test_world_target_generates_the_same_through_both_draft_paths(monkeypatch):
    """The committed Qwen2.5-VL world target and its Sparrow draft: greedy output and tau identical
    with the compiled draft phase and with SPARROW_CPU_DRAFT=0 (the Python path)."""
    from sparrow_kernels.data.world import World, heldout_world_seed
    from sparrow_kernels.speculative.draft import SparrowDraft, committed_draft_dir
    from sparrow_kernels.speculative.engine import SparrowGenerator
    from sparrow_kernels.targets import WORLD_TARGET, load_target
    from sparrow_kernels.targets.world_prompt import world_prompt

    target = load_target(WORLD_TARGET)
    draft = SparrowDraft.load(committed_draft_dir(target=WORLD_TARGET), target)
    with torch.inference_mode():
        assert cpu_draft.available(draft)
    prompt = world_prompt(target, World(heldout_world_seed(7001)), 96)
    fast = SparrowGenerator(target, draft, TreeShape(12, 5, 2)).generate([prompt], 40)
    monkeypatch.setenv("SPARROW_CPU_DRAFT", "0")
    slow = SparrowGenerator(target, draft, TreeShape(12, 5, 2)).generate([prompt], 40)
    assert fast.tokens == slow.tokens and fast.stats.steps == slow.stats.steps
