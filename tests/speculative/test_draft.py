"""Tests of the draft model (sparrow_kernels/speculative/draft.py): cache/tree API against a plain
full-sequence forward, training-time unroll against inference, window/anchor semantics,
persistence without the target's frozen weights, and input errors."""
from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

from sparrow_kernels.speculative.draft import DraftCache, DraftConfig, SparrowDraft

torch.set_num_threads(1)
V, H = 37, 32


class StandInTarget:
    """The part of the Target protocol a draft uses: embedding, final norm + LM head, sizes."""

    hidden_size, vocab_size, num_layers = H, V, 4
    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(V, H)
        self.head = nn.Sequential(nn.RMSNorm(H), nn.Linear(H, V, bias=False))
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(V, H, generator=g))
            self.head[1].weight.copy_(torch.randn(V, H, generator=g) * 0.3)

    def embed_tokens(self):
        return self.embed

    def lm_head(self):
        return self.head


def make_draft(window=0, n_anchor=0, heads=4, kv_heads=2, head_dim=8, layers=(4,), seed=0) -> SparrowDraft:
    torch.manual_seed(seed)
    cfg = DraftConfig(hidden_size=H, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                      intermediate_size=48, vocab_size=V, feature_layers=layers, window=window, n_anchor=n_anchor)
    draft = SparrowDraft.from_target(cfg, StandInTarget())
    with torch.no_grad():      # larger random weights: differences between paths are not hidden by scale
        for p in draft.parameters():
            if p.dim() == 2:
                p.mul_(2.0)
    return draft


def rand_inputs(B, T, F, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randn(B, T, F, generator=g)


def tight(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- extend == full forward
@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 12), window=st.sampled_from([0, 1, 3, 5, 20]),
       n_anchor=st.integers(0, 4), gqa=st.sampled_from([(4, 2), (3, 1), (2, 2)]), seed=st.integers(0, 99))
def test_extend_in_chunks_equals_full_forward(B, T, window, n_anchor, gqa, seed):
    draft = make_draft(window, n_anchor, heads=gqa[0], kv_heads=gqa[1], seed=seed)
    tokens, feats = rand_inputs(B, T, H, seed)
    g = torch.Generator().manual_seed(seed + 1)
    valid = torch.randint(1, T + 1, (B,), generator=g)
    full = draft(tokens, feats, valid)                                     # [B, T, H]
    # commit the same entries in two ragged chunks per row (right padded)
    cache = draft.new_cache(B, T + 4)
    first = torch.randint(0, T + 1, (B,), generator=g).minimum(valid)
    h1 = draft.extend(cache, tokens, feats, first)
    rest = valid - first
    T2 = max(1, int(rest.max()))
    tok2 = torch.zeros(B, T2, dtype=torch.long)
    feat2 = torch.full((B, T2, H), float("nan"))                           # padding is poison: must not leak
    for b in range(B):
        n, s = int(rest[b]), int(first[b])
        tok2[b, :n], feat2[b, :n] = tokens[b, s:s + n], feats[b, s:s + n]
    h2 = draft.extend(cache, tok2, feat2, rest)
    assert torch.equal(cache.lengths, valid)
    for b in range(B):
        s, n = int(first[b]), int(rest[b])
        tight(h1[b, :s], full[b, :s])
        tight(h2[b, :n], full[b, s:s + n])
        assert torch.isfinite(h2[b, :n]).all()


@pytest.mark.parametrize("gqa", [(4, 2), (3, 1)])
def test_full_causal_prefill_of_an_empty_cache_equals_full_forward(gqa):
    """extend's SDPA path (window <= 0, empty cache, every row full) against window_attn."""
    draft = make_draft(0, 0, heads=gqa[0], kv_heads=gqa[1], seed=3)
    tokens, feats = rand_inputs(2, 11, H, 4)
    valid = torch.tensor([11, 11])
    full = draft(tokens, feats, valid)
    with torch.inference_mode():
        cache = draft.new_cache(2, 16)
        tight(draft.extend(cache, tokens, feats, valid), full)
        # the cache it leaves behind serves the next entry as window_attn would
        more_tok, more_feat = rand_inputs(2, 1, H, 5)
        nxt = draft.extend(cache, more_tok, more_feat, torch.tensor([1, 1]))
    both = draft(torch.cat([tokens, more_tok], 1), torch.cat([feats, more_feat], 1), torch.tensor([12, 12]))
    tight(nxt[:, 0], both[:, 11])


def test_batched_rows_equal_single_rows():
    draft = make_draft(window=4, n_anchor=2)
    tokens, feats = rand_inputs(3, 9, H, 5)
    valid = torch.tensor([9, 4, 7])
    batched = draft(tokens, feats, valid)
    for b in range(3):
        n = int(valid[b])
        tight(batched[b, :n], draft(tokens[b:b + 1, :n], feats[b:b + 1, :n], valid[b:b + 1])[0])


# ----------------------------------------------------------------------------- tree == chains
def random_tree(rng: torch.Generator, per_depth: list[int]):
    """Nodes added depth by depth; each node's parent is a node of the previous depth (or the
    committed root for depth 1). Returns parents (list, -1 = root) and depths."""
    parents, depths, prev = [], [], [-1]
    for d, width in enumerate(per_depth, start=1):
        cur = []
        for _ in range(width):
            parents.append(prev[int(torch.randint(0, len(prev), (1,), generator=rng))])
            depths.append(d)
            cur.append(len(parents) - 1)
        prev = cur
    return parents, depths


@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 3), prefix=st.integers(1, 9), per_depth=st.lists(st.integers(1, 4), min_size=1, max_size=4),
       window=st.sampled_from([0, 2, 4, 30]), n_anchor=st.integers(0, 3), seed=st.integers(0, 99))
def test_tree_nodes_equal_their_chains(B, prefix, per_depth, window, n_anchor, seed):
    """Every draft_step node output equals extend() over its root-to-node path as a plain chain."""
    draft = make_draft(window, n_anchor, seed=seed)
    rng = torch.Generator().manual_seed(seed)
    tokens, feats = rand_inputs(B, prefix, H, seed)
    lengths = torch.randint(1, prefix + 1, (B,), generator=rng)
    parents, depths = random_tree(rng, per_depth)
    M = len(parents)
    node_tokens = torch.randint(0, V, (B, M), generator=rng)
    root_hidden = torch.randn(B, H, generator=rng)                          # hidden that predicted depth-1 nodes

    cache = draft.new_cache(B, prefix + M + 1)
    draft.extend(cache, tokens, feats, lengths)
    ancestor = torch.zeros(M, M, dtype=torch.bool)
    for i, p in enumerate(parents):
        ancestor[i, i] = True
        if p >= 0:
            ancestor[i] |= ancestor[p]
    outputs = torch.full((B, M, H), float("nan"))
    start = 0
    for d, width in enumerate(per_depth, start=1):
        idx = list(range(start, start + width))
        prev = torch.stack([root_hidden if parents[i] < 0 else outputs[:, parents[i]] for i in idx], dim=1)
        mask = ancestor[idx][:, :start + width][None].expand(B, -1, -1).contiguous()
        outputs[:, idx] = draft.draft_step(cache, node_tokens[:, idx], prev, torch.full((B, width), d), mask)
        start += width
    assert cache.scratch_len == M and torch.equal(cache.lengths, lengths)

    for i in range(M):
        path = [i]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        path = path[::-1]                                                  # root-to-node
        chain = draft.new_cache(B, prefix + M + 1)
        draft.extend(chain, tokens, feats, lengths)
        chain_feats = torch.stack([root_hidden] + [outputs[:, j] for j in path[:-1]], dim=1)
        chain_out = draft.extend(chain, node_tokens[:, path], chain_feats, torch.full((B,), len(path)))
        tight(outputs[:, i], chain_out[:, -1])


def test_extend_drops_scratch_nodes():
    draft = make_draft(window=0)
    tokens, feats = rand_inputs(1, 6, H, 3)
    c1, c2 = draft.new_cache(1, 16), draft.new_cache(1, 16)
    draft.extend(c1, tokens[:, :4], feats[:, :4], torch.tensor([4]))
    draft.extend(c2, tokens[:, :4], feats[:, :4], torch.tensor([4]))
    junk = torch.randn(1, 3, H)
    draft.draft_step(c1, tokens[:, :3], junk, torch.ones(1, 3, dtype=torch.long),
                     torch.eye(3, dtype=torch.bool)[None])
    tight(draft.extend(c1, tokens[:, 4:], feats[:, 4:], torch.tensor([2])),
          draft.extend(c2, tokens[:, 4:], feats[:, 4:], torch.tensor([2])))
    assert c1.scratch_len == 0


# ----------------------------------------------------------------------------- training unroll == inference
@settings(max_examples=8, deadline=None)
@given(S=st.integers(3, 10), steps=st.integers(1, 4), query_start=st.integers(0, 2),
       window=st.sampled_from([0, 4, 6]), n_anchor=st.integers(0, 3), seed=st.integers(0, 99))
def test_unrolled_forward_equals_draft_step_chains(S, steps, query_start, window, n_anchor, seed):
    """MTP training sees exactly what inference sees: chain e's step-k output equals
    extend(entries <= e) followed by k-1 draft_step calls fed with the previous hidden."""
    draft = make_draft(window, n_anchor, seed=seed)
    tokens, feats = rand_inputs(2, S, H, seed)
    valid = torch.tensor([S, max(query_start + 1, S - 2)])
    outs = draft.unrolled_forward(tokens, feats, valid, steps, query_start)
    assert len(outs) == steps and outs[0].shape == (2, S - query_start, H)
    for e in range(query_start, S):
        for b in range(2):
            if e >= int(valid[b]):
                continue
            cache = draft.new_cache(1, S + steps)
            hidden = draft.extend(cache, tokens[b:b + 1, :e + 1], feats[b:b + 1, :e + 1], torch.tensor([e + 1]))
            hidden = hidden[:, -1:]
            tight(outs[0][b, e - query_start], hidden[0, 0])
            for k in range(2, steps + 1):
                if e + k - 1 >= int(valid[b]):
                    break
                mask = torch.ones(1, 1, k - 1, dtype=torch.bool)
                hidden = draft.draft_step(cache, tokens[b:b + 1, e + k - 1:e + k], hidden,
                                          torch.tensor([[k - 1]]), mask)
                tight(outs[k - 1][b, e - query_start], hidden[0, 0])


def test_unrolled_forward_backward_reaches_every_weight():
    draft = make_draft(window=4, n_anchor=1)
    tokens, feats = rand_inputs(2, 8, H, 1)
    outs = draft.unrolled_forward(tokens, feats, torch.tensor([8, 6]), 3)
    sum(o.square().mean() for o in outs).backward()
    for name, p in draft.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------- window / anchors
@pytest.mark.parametrize("window,n_anchor", [(3, 0), (3, 2), (5, 1)])
def test_keys_outside_window_do_not_matter(window, n_anchor):
    draft = make_draft(window, n_anchor)
    T = 12
    tokens, feats = rand_inputs(1, T, H, 7)
    valid = torch.tensor([T])
    last = T - 1
    base = draft(tokens, feats, valid)[0, last]
    for j in range(last):
        t2, f2 = tokens.clone(), feats.clone()
        t2[0, j] = (t2[0, j] + 1) % V
        f2[0, j] += 3.0
        changed = draft(t2, f2, valid)[0, last]
        visible = j >= last - window + 1 or j < n_anchor
        if visible:
            assert not torch.allclose(changed, base, atol=1e-4), f"key {j} is visible but had no effect"
        else:
            tight(changed, base)


def test_cache_window_matches_full_attention_on_last_keys():
    """Decode with a window equals unlimited attention over [anchors + last window keys]."""
    window, n_anchor, T = 4, 2, 10
    windowed, unlimited = make_draft(window, n_anchor), make_draft(0, 0)
    unlimited.load_state_dict(windowed.state_dict())
    tokens, feats = rand_inputs(1, T, H, 11)
    cache = windowed.new_cache(1, T)
    out = windowed.extend(cache, tokens, feats, torch.tensor([T]))[0, -1]
    keep = list(range(n_anchor)) + list(range(T - window, T))
    # unlimited attention restricted by hand to the same keys at the same RoPE positions
    x = unlimited.input_states(tokens, feats)
    q, k, v = unlimited.qkv(x, torch.arange(T)[None])
    scores = torch.einsum("hd,hkd->hk", q[0, :, -1], k[0].repeat_interleave(2, 0)[:, keep]) * unlimited.scale
    attn = torch.einsum("hk,hkd->hd", scores.softmax(-1), v[0].repeat_interleave(2, 0)[:, keep])
    expected = unlimited.finish(x[:, -1:], attn[None, :, None])[0, 0]
    tight(out, expected)


# ----------------------------------------------------------------------------- EAGLE-3 features
def test_multi_layer_features_are_fused():
    draft = make_draft(layers=(1, 2, 4))
    assert draft.config.feature_size == 3 * H and draft.feature_fuse is not None
    tokens, feats = rand_inputs(2, 5, 3 * H, 2)
    full = draft(tokens, feats, torch.tensor([5, 5]))
    cache = draft.new_cache(2, 8)
    tight(draft.extend(cache, tokens, feats, torch.tensor([5, 5])), full)
    with pytest.raises(ValueError, match=r"features must have shape \[2, 5, 96\]"):
        draft.extend(draft.new_cache(2, 8), tokens, feats[..., :H], torch.tensor([5, 5]))


# ----------------------------------------------------------------------------- persistence
def test_save_load_round_trip_excludes_target_weights(tmp_path):
    draft = make_draft(window=6, n_anchor=2, layers=(1, 4))
    draft.training_info = {"preset": "test"}
    draft.save(tmp_path)
    tensors = load_file(os.path.join(tmp_path, "model.safetensors"))
    assert not any("embed_tokens" in n or "lm_head" in n or "frozen" in n for n in tensors)
    assert all(t.shape != (V, H) for t in tensors.values())               # no embedding / LM head matrix
    assert set(tensors) == set(draft.state_dict())
    payload = json.loads((tmp_path / "config.json").read_text())
    assert payload["config"]["feature_layers"] == [1, 4] and payload["training"] == {"preset": "test"}

    target = StandInTarget()
    loaded = SparrowDraft.load(tmp_path, target)
    assert loaded.config == draft.config and loaded.training_info == {"preset": "test"}
    assert loaded.frozen.embed_tokens is target.embed and loaded.frozen.lm_head is target.head
    tokens, feats = rand_inputs(2, 6, 2 * H, 4)
    draft.frozen = loaded.frozen           # same frozen parts for both: only the draft weights differ
    tight(loaded(tokens, feats, torch.tensor([6, 3])), draft(tokens, feats, torch.tensor([6, 3])))
    tight(loaded.logits(torch.ones(3, H)), target.head(torch.ones(3, H)))


def test_load_rejects_mismatched_target_and_missing_files(tmp_path):
    make_draft().save(tmp_path)

    class Wider(StandInTarget):
        hidden_size = H * 2

    with pytest.raises(ValueError, match="hidden_size"):
        SparrowDraft.load(tmp_path, Wider())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        SparrowDraft.load(tmp_path / "nothing", StandInTarget())


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    draft = make_draft(window=4)
    cache = draft.new_cache(2, 6)
    tokens, feats = rand_inputs(2, 4, H)
    with pytest.raises(ValueError, match=r"tokens must have dtype int64"):
        draft.extend(cache, tokens.int(), feats, torch.tensor([4, 4]))
    with pytest.raises(ValueError, match=r"valid must have shape \[2\]"):
        draft.extend(cache, tokens, feats, torch.tensor([4]))
    with pytest.raises(ValueError, match="cache was made for batch 3, got inputs of batch 2"):
        draft.extend(draft.new_cache(3, 6), tokens, feats, torch.tensor([4, 4]))
    draft.extend(cache, tokens, feats, torch.tensor([4, 2]))
    with pytest.raises(ValueError, match="capacity is 6"):
        draft.extend(cache, tokens, feats, torch.tensor([4, 4]))
    prev = torch.randn(2, 3, H)
    with pytest.raises(ValueError, match=r"tree_mask must have shape \[2, 3, 3\]"):
        draft.draft_step(cache, tokens[:, :3], prev, torch.ones(2, 3, dtype=torch.long),
                         torch.ones(2, 3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="depth must be >= 1"):
        draft.draft_step(cache, tokens[:, :3], prev, torch.zeros(2, 3, dtype=torch.long),
                         torch.ones(2, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="exceed the cache capacity 6"):
        draft.draft_step(cache, tokens[:, :3], prev, torch.ones(2, 3, dtype=torch.long),
                         torch.ones(2, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="cache must be a DraftCache"):
        draft.reset_scratch(cache) or draft.extend(object(), tokens, feats, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="window=4 must be 0 or >= steps=5"):
        draft.unrolled_forward(tokens, feats, torch.tensor([4, 4]), 5)
    with pytest.raises(ValueError, match="num_heads=3 must be a positive multiple of num_kv_heads=2"):
        DraftConfig(H, 3, 2, 8, 16, V, (4,))
    assert isinstance(cache, DraftCache)


# ----------------------------------------------------------------------------- committed drafts
COMMITTED = {"sparrow": False, "vata": False, "vata_mtp": False, "visual_kv": True, "none": True, "mtp": True,
             "mtp_ivsb": True}


def test_committed_drafts_match_the_committed_target():
    """Each committed draft loads with the committed tiny VLM, was trained on exactly those
    target weights (a retrained target needs retrained drafts), has the cache layout its
    name says, and the Sparrow draft agrees with the target's greedy tokens on a held-out video."""
    from sparrow_kernels.speculative.draft import committed_draft_dir
    from sparrow_kernels.targets.tinyvlm import TinyVLMTarget
    from sparrow_kernels.training.distill_data import HiddenStateStore, answer_groups, tiny_plan
    from sparrow_kernels.training.train_draft import evaluate, target_fingerprint

    target = TinyVLMTarget.load()
    fingerprint = target_fingerprint("tiny", target)
    for name, visual_kv in COMMITTED.items():
        draft = SparrowDraft.load(committed_draft_dir(name), target)
        assert draft.config.visual_kv is visual_kv, name
        assert draft.training_info["target"] == fingerprint, f"draft {name} was trained for another target"
    sparrow = SparrowDraft.load(committed_draft_dir("sparrow"), target)
    groups = answer_groups(target, tiny_plan(target, 1, 2, 8, 8, seed=3, caption_fraction=1.0, heldout=True),
                           max_new_tokens=48, progress=False)
    store = HiddenStateStore(target, sorted({*sparrow.config.feature_layers, target.num_layers}), None, 0, "t")
    layout = {"include_visual": False, "visual_first": False, "visual_layer": None}
    result = evaluate(sparrow, store, groups, layout, 2, target.num_layers)
    assert result["positions"] > 20 and result["top1_per_step"][0] > 0.7, result
