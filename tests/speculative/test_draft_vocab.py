"""The draft vocabulary (SparrowDraft.draft_vocab, EAGLE-3's draft-to-target map): the draft's
logits are the target head's on its K ids and -inf elsewhere (fast rows path and masked path
alike), trees and sampled distributions stay inside it, greedy output stays the target's own,
it round-trips through save/load, and bad vocabularies are refused with the argument named."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparrow_kernels.speculative import cpu_draft
from sparrow_kernels.speculative.draft import DraftConfig, SparrowDraft, committed_draft_dir
from sparrow_kernels.speculative.engine import SparrowGenerator, autoregressive_generate
from sparrow_kernels.speculative.tree import TreeShape, build_tree

from .helpers import random_draft, tiny_vlm, vlm_prompts
from .test_draft import V, StandInTarget, make_draft, rand_inputs

torch.set_num_threads(1)


def _vocab(seed: int, k: int) -> torch.Tensor:
    return torch.randperm(V, generator=torch.Generator().manual_seed(seed))[:k]


@pytest.mark.parametrize("grad", [False, True])
def test_logits_are_the_heads_inside_and_minus_inf_outside(grad):
    draft = make_draft(seed=3)
    ids = _vocab(0, 11)
    draft.set_draft_vocab(ids)
    assert draft.config.draft_vocab_size == 11 and torch.equal(draft.draft_vocab, ids.sort().values)
    hidden = torch.randn(2, 5, draft.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.set_grad_enabled(grad):
        assert (draft.vocab_head_rows() is None) == grad          # rows path only while drafting
        got = draft.logits(hidden)
        full = draft.head_logits(hidden)
    assert got.shape == full.shape == (2, 5, V)
    inside = torch.zeros(V, dtype=torch.bool)
    inside[ids] = True
    torch.testing.assert_close(got[..., inside], full[..., inside], rtol=1e-5, atol=1e-5)
    assert bool(torch.isneginf(got[..., ~inside]).all())
    draft.set_draft_vocab(None)
    assert draft.draft_vocab is None and draft.config.draft_vocab_size == 0
    torch.testing.assert_close(draft.logits(hidden), full)


def test_a_nan_hidden_stays_visible():
    draft = make_draft()
    draft.set_draft_vocab(_vocab(1, 9))
    hidden = torch.randn(1, draft.config.hidden_size)
    hidden[0, 3] = float("nan")
    with torch.no_grad():
        logits = draft.logits(hidden)
    assert bool(torch.isnan(logits[0, draft.draft_vocab]).all())


def test_python_tree_and_sampled_distributions_stay_inside():
    draft = make_draft(seed=2)
    draft.set_draft_vocab(_vocab(2, 10))
    cache = draft.new_cache(2, 60)
    tokens, features = rand_inputs(2, 6, draft.config.feature_size, seed=4)
    with torch.inference_mode():
        hidden = draft.extend(cache, tokens, features, torch.tensor([6, 4]))
        root_hidden = hidden[torch.arange(2), torch.tensor([5, 3])]
        tree = build_tree(draft, cache, torch.tensor([1, 2]), root_hidden, TreeShape(16, 3, 4))
        assert bool(torch.isin(tree.tokens[:, 1:], draft.draft_vocab).all())
        sampled = build_tree(draft, cache, torch.tensor([1, 2]), root_hidden, TreeShape(16, 3, 4),
                             sampler=lambda logits: torch.softmax(logits.float(), -1),
                             generator=torch.Generator().manual_seed(0))
    assert bool(torch.isin(sampled.tokens[:, 1:], draft.draft_vocab).all())
    probs = sampled.draft_probs                                            # [B, N, V], rows of expanded nodes
    expanded = probs.sum(-1) > 0
    torch.testing.assert_close(probs.sum(-1)[expanded], torch.ones(int(expanded.sum())))
    outside = torch.ones(V, dtype=torch.bool)
    outside[draft.draft_vocab] = False
    assert bool((probs[..., outside] == 0).all())


def test_set_draft_vocab_and_config_reject_bad_vocabularies():
    draft = make_draft()
    for bad, pattern in [(torch.tensor([3, 3, 5]), "strictly increasing"), (torch.tensor([0, V]), r"outside \[0, "),
                         (torch.tensor([-1, 2]), "outside"), (torch.tensor([], dtype=torch.int64), "non-empty"),
                         (torch.tensor([1.0, 2.0]), "integer"), (torch.arange(4).view(2, 2), "1-D")]:
        with pytest.raises(ValueError, match=pattern):
            draft.set_draft_vocab(bad)
        assert draft.draft_vocab is None and draft.config.draft_vocab_size == 0     # unchanged
    with pytest.raises(ValueError, match=rf"draft_vocab_size must be 0 .* or in \[1, vocab_size={V}\], got {V + 1}"):
        DraftConfig(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48, vocab_size=V,
                    feature_layers=(4,), draft_vocab_size=V + 1)


def test_save_load_round_trip_and_tampered_files(tmp_path):
    draft = make_draft(seed=5)
    draft.set_draft_vocab(_vocab(5, 12))
    draft.save(tmp_path)
    loaded = SparrowDraft.load(tmp_path, StandInTarget())
    assert torch.equal(loaded.draft_vocab, draft.draft_vocab) and loaded.config.draft_vocab_size == 12
    state = load_file(str(tmp_path / "model.safetensors"))
    for name, bad in [("unsorted", state["draft_vocab"].flip(0).contiguous()),
                      ("out_of_range", torch.cat([state["draft_vocab"][:-1], torch.tensor([V + 3])]))]:
        save_file({**state, "draft_vocab": bad}, str(tmp_path / "model.safetensors"))
        with pytest.raises(ValueError, match=r"draft_vocab in .*model.safetensors"):
            SparrowDraft.load(tmp_path, StandInTarget())
    short = {**state, "draft_vocab": state["draft_vocab"][:5].contiguous()}          # config says 12
    save_file(short, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="do not fit its config"):
        SparrowDraft.load(tmp_path, StandInTarget())


@pytest.mark.parametrize("fast_draft", [True, False])
def test_greedy_output_is_the_targets_with_a_vocab_draft(fast_draft):
    """A random draft restricted to half the vocabulary, and the committed tiny draft restricted to
    the ids its target's answers use: greedy output identical to plain greedy decoding."""
    target = tiny_vlm(seed=0, vocab_size=64)
    prompts = vlm_prompts(target, 3, seed=5)
    draft = random_draft(target, seed=1)
    draft.set_draft_vocab(torch.arange(0, 64, 2))
    if fast_draft:                    # the compiled CPU phase must be the path under test
        with torch.inference_mode():
            assert cpu_draft.available(draft)
    spec = SparrowGenerator(target, draft, TreeShape(12, 5, 2), fast_draft=fast_draft).generate(prompts, 16,
                                                                                                 capacity=256)
    plain = autoregressive_generate(target, prompts, 16, capacity=256)
    assert spec.tokens == plain.tokens


def test_committed_tiny_draft_with_a_vocabulary_accepts_and_stays_lossless():
    """The committed tiny draft restricted to the ids the target's answers use (plus a few
    others): the same output as plain greedy decoding, and it still drafts (tau > 2)."""
    from sparrow_kernels.targets import load_target

    target = load_target("tiny")
    draft = SparrowDraft.load(committed_draft_dir(), target)
    prompts = [target.world_prompt(seed, 8) for seed in (7000, 7001)]
    plain = autoregressive_generate(target, prompts, 24)
    used = sorted({t for row in plain.tokens for t in row})
    draft.set_draft_vocab(torch.tensor(used + [i for i in range(target.vocab_size) if i not in used][:4]))
    spec = SparrowGenerator(target, draft, TreeShape(12, 5, 2)).generate(prompts, 24)
    assert spec.tokens == plain.tokens
    assert spec.stats.tau > 2.0


def test_a_vocabulary_smaller_than_top_k_gives_fewer_children_on_both_paths():
    """K = 1 < top_k = 2: every node gets the one id (a chain), through the Python tree and the
    compiled CPU phase alike."""
    draft = make_draft(seed=4)
    draft.set_draft_vocab(torch.tensor([5]))
    shape = TreeShape(6, 3, 2)
    caches = [draft.new_cache(1, 40) for _ in range(2)]
    tokens, features = rand_inputs(1, 4, draft.config.feature_size, seed=6)
    with torch.inference_mode():
        hidden = [draft.extend(c, tokens, features, torch.tensor([4])) for c in caches][0][:, -1]
        expect = build_tree(draft, caches[0], torch.tensor([2]), hidden, shape)
        fast = cpu_draft.prepare(draft, shape)
        assert fast is not None
        got = fast.build_tree(caches[1], torch.tensor([2]), hidden)
    assert expect.tokens.tolist() == got.tokens.tolist() == [[2, 5, 5, 5, 5]]
    assert expect.parents.tolist() == got.parents.tolist() == [[-1, 0, 1, 2, 3]]


def test_cached_rows_follow_the_vocabulary():
    """Vocabulary A, then none, then C of the same size: the draft's logits are C's rows (the
    cached LM-head rows of A are never reused)."""
    draft = make_draft(seed=6)
    hidden = torch.randn(3, draft.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        draft.set_draft_vocab(torch.arange(0, 10))
        draft.logits(hidden)
        draft.set_draft_vocab(None)
        draft.logits(hidden)
        draft.set_draft_vocab(torch.arange(20, 30))
        got = draft.logits(hidden)
        full = draft.head_logits(hidden)
    torch.testing.assert_close(got[:, 20:30], full[:, 20:30])
    assert bool(torch.isneginf(got[:, :20]).all())
