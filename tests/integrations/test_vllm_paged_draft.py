"""The vLLM-side draft (sparrow_kernels.integrations.vllm.paged_draft), run the way vLLM's EAGLE
proposer runs it (every position, shifted tokens, chunked prefill, chain steps, paged slots), equals
the project's engine semantics (kept positions, draft_inputs.open_entries, extend, draft_step),
and never reads a visual position. No vLLM needed.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sparrow_kernels.draft import DraftConfig, SparrowDraft
from sparrow_kernels.draft_inputs import kept_mask, kept_positions, open_entries
from sparrow_kernels.integrations.vllm.paged_draft import PagedBatch, PagedStore, VisualRule, draft_forward

V, H, HKV, D = 50, 32, 2, 8
VISION_START, PAD, VISION_END = 40, 41, 42
RULE = VisualRule(placeholder_ids=(PAD, 43), text_after_visual_id=VISION_END)
BLOCK = 4


def make_draft(window: int, n_anchor: int, visual_kv: bool = False) -> SparrowDraft:
    torch.manual_seed(0)
    cfg = DraftConfig(hidden_size=H, num_heads=4, num_kv_heads=HKV, head_dim=D, intermediate_size=48,
                      vocab_size=V, feature_layers=(3,), window=window, n_anchor=n_anchor, visual_kv=visual_kv)
    draft = SparrowDraft(cfg, nn.Embedding(V, H), nn.Linear(H, V))
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return draft.eval()


def prompt(n_video: int, tail: int) -> torch.Tensor:
    torch.manual_seed(1)
    text = torch.randint(0, 30, (5 + tail,))
    return torch.cat([text[:5], torch.tensor([VISION_START]), torch.full((n_video,), PAD),
                      torch.tensor([VISION_END]), text[5:]])


def engine_reference(draft, tokens, features, next_token):
    """What the project's engine feeds the draft for one prompt: kept entries, then extend."""
    text_mask = ~torch.isin(tokens, torch.tensor(RULE.placeholder_ids))
    keep = kept_mask(text_mask[None], torch.tensor([tokens.numel()]), draft.config.visual_kv)
    order, count = kept_positions(keep)
    entry_pos, entry_tokens = open_entries(order, count, tokens[None], torch.tensor([next_token]))
    cache = draft.new_cache(1, int(count) + 8)
    hidden = draft.extend(cache, entry_tokens, features[entry_pos[0]][None], count)
    return order[0], hidden[0], cache


class FakeVllm:
    """The proposer's view of one engine: a paged store and one block table per request."""

    def __init__(self, draft, n_requests: int, max_len: int, poison_visual: bool = False):
        n_blocks = n_requests * (max_len // BLOCK + 1)
        kv = torch.full((n_blocks, HKV, BLOCK, 2 * D), float("nan") if poison_visual else 0.0)
        self.store = PagedStore(kv, HKV, D)
        generator = torch.Generator().manual_seed(2)
        self.block_table = torch.randperm(n_blocks, generator=generator).view(n_requests, -1)
        self.draft = draft
        self.lengths = [0] * n_requests

    def forward(self, chunks: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[int, torch.Tensor]:
        rows = sorted(chunks)
        tokens = torch.cat([chunks[r][0] for r in rows])
        features = torch.cat([chunks[r][1] for r in rows])
        qsl = torch.tensor([0] + [chunks[r][0].numel() for r in rows]).cumsum(0)
        for r in rows:
            self.lengths[r] += chunks[r][0].numel()
        batch = PagedBatch(qsl, torch.tensor([self.lengths[r] for r in rows]), self.block_table[rows], BLOCK)
        rule = VisualRule(RULE.placeholder_ids, RULE.text_after_visual_id, keep_visual=self.draft.config.visual_kv)
        hidden = draft_forward(self.draft, self.store, batch, tokens, features, rule)
        return {r: hidden[qsl[i]:qsl[i + 1]] for i, r in enumerate(rows)}


@pytest.mark.parametrize("window,n_anchor", [(0, 0), (6, 3)])
@pytest.mark.parametrize("visual_kv", [False, True])
@torch.no_grad()
def test_chunked_prefill_and_chain_steps_match_the_engine(window, n_anchor, visual_kv):
    draft = make_draft(window, n_anchor, visual_kv)
    prompts = [prompt(9, 6), prompt(5, 3)]
    features = [torch.randn(p.numel(), H) for p in prompts]
    next_tokens = [7, 11]
    vllm = FakeVllm(draft, 2, 64, poison_visual=not visual_kv)
    # the proposer's shift: entry i gets token i+1, the last entry the token just sampled
    shifted = [torch.cat([p[1:], torch.tensor([t])]) for p, t in zip(prompts, next_tokens)]
    cuts = [(0, 7, 12, prompts[0].numel()), (0, 4, prompts[1].numel())]   # chunk edges inside the video
    hidden = [[], []]
    for step in range(3):
        chunks = {}
        for r in range(2):
            if step + 1 < len(cuts[r]):
                a, b = cuts[r][step], cuts[r][step + 1]
                chunks[r] = (shifted[r][a:b], features[r][a:b])
        for r, h in vllm.forward(chunks).items():
            hidden[r].append(h)
    for r in range(2):
        order, ref_hidden, ref_cache = engine_reference(draft, prompts[r], features[r], next_tokens[r])
        got = torch.cat(hidden[r])[order[order >= 0]]
        torch.testing.assert_close(got, ref_hidden, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(torch.cat(hidden[r])).all()

    # two chain steps (vLLM's draft loop) == the engine's draft_step along one branch
    prev = {r: torch.cat(hidden[r])[-1:] for r in range(2)}
    ref_prev = {}
    caches = {}
    for r in range(2):
        _, ref_hidden, caches[r] = engine_reference(draft, prompts[r], features[r], next_tokens[r])
        ref_prev[r] = ref_hidden[-1:]
    for depth, tokens in enumerate(([3, 4], [5, 6]), start=1):
        out = vllm.forward({r: (torch.tensor([tokens[r]]), prev[r]) for r in range(2)})
        for r in range(2):
            ref = draft.draft_step(caches[r], torch.tensor([[tokens[r]]]), ref_prev[r][None],
                                   torch.tensor([[depth]]), torch.ones(1, 1, depth, dtype=torch.bool))[0]
            torch.testing.assert_close(out[r], ref, rtol=1e-5, atol=1e-5)
            prev[r], ref_prev[r] = out[r], ref


@torch.no_grad()
def test_poisoned_visual_positions_change_nothing():
    """Noise in the target features at visual positions and NaN in every cache slot that was not
    written: the hidden states of every kept entry are bit-identical."""
    draft = make_draft(6, 3)
    p = prompt(12, 5)
    features = torch.randn(p.numel(), H)
    shifted = torch.cat([p[1:], torch.tensor([9])])
    visual = torch.isin(p, torch.tensor(RULE.placeholder_ids))
    poisoned = torch.where(visual[:, None], 1e4 * torch.randn_like(features), features)
    outs = []
    for feats, poison in ((features, False), (poisoned, True)):
        vllm = FakeVllm(draft, 1, 64, poison_visual=poison)
        h = torch.cat([vllm.forward({0: (shifted[a:b], feats[a:b])})[0] for a, b in ((0, 9), (9, p.numel()))])
        outs.append(h[~visual])
    assert torch.equal(outs[0], outs[1])


def test_unknown_cache_layout_is_refused():
    with pytest.raises(ValueError, match="kv_cache of shape"):
        PagedStore(torch.zeros(3, HKV, BLOCK, D), HKV, D)


@pytest.mark.parametrize("layout", ["cpu", "flash"])
def test_store_keeps_slots_apart_in_both_layouts(layout):
    """Writes land in their slot of vLLM's tensor (CPU: [block, head, offset, :D] keys, [.., D:]
    values; flash: [0|1, block, offset, head]) and read back; other slots stay untouched."""
    n_blocks = 3
    kv = torch.zeros(n_blocks, HKV, BLOCK, 2 * D) if layout == "cpu" else torch.zeros(2, n_blocks, BLOCK, HKV, D)
    store = PagedStore(kv, HKV, D)
    slots = torch.tensor([5, 0, 11])
    k, v = torch.randn(3, HKV, D), torch.randn(3, HKV, D)
    store.write(slots, k, v)
    got_k, got_v = store.read(slots)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    if layout == "cpu":
        assert torch.equal(kv[1, :, 1, :D], k[0]) and torch.equal(kv[1, :, 1, D:], v[0])
    else:
        assert torch.equal(kv[0, 1, 1], k[0]) and torch.equal(kv[1, 1, 1], v[0])
    assert int((kv != 0).sum()) == 2 * k.numel()

