"""The vLLM-side draft (sparrow_kernels.integrations.vllm.paged_draft), run the way vLLM's EAGLE
proposer runs it (every position, shifted tokens, chunked prefill, chain steps, paged slots), equals
the project's engine semantics (kept positions, draft_inputs.open_entries, extend, draft_step),
and never reads a visual position. No vLLM needed.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sparrow_kernels.integrations.vllm.paged_draft import PagedBatch, PagedStore, VisualRule, draft_forward
from sparrow_kernels.speculative.draft import DraftConfig, SparrowDraft
from sparrow_kernels.speculative.draft_inputs import kept_mask, kept_positions, open_entries

V, H, HKV, D = 50, 32, 2, 8
VISION_START, PAD, VISION_END = 40, 41, 42
RULE = VisualRule(placeholder_ids=(PAD, 43), text_after_visual_id=VISION_END, run_start_id=VISION_START)
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


def engine_reference(draft, tokens, features, next_token, vllm_backup_at=()):
    """What the project's engine feeds the draft for one prompt: kept entries, then extend.
    `vllm_backup_at`: positions whose entry vLLM pairs with the prompt's last token instead
    (the last entry of a partial prefill chunk), so that the same inputs are compared."""
    text_mask = ~torch.isin(tokens, torch.tensor(RULE.placeholder_ids))
    keep = kept_mask(text_mask[None], torch.tensor([tokens.numel()]), draft.config.visual_kv)
    order, count = kept_positions(keep)
    entry_pos, entry_tokens = open_entries(order, count, tokens[None], torch.tensor([next_token]))
    for position in vllm_backup_at:
        entry_tokens[entry_pos == position] = tokens[-1]
    cache = draft.new_cache(1, int(count) + 8)
    hidden = draft.extend(cache, entry_tokens, features[entry_pos[0]][None], count)
    return order[0], hidden[0], cache


def proposer_inputs(prompt: torch.Tensor, next_token: int, a: int, b: int):
    """What vLLM's proposer gives the draft for the prompt chunk [a, b): the shifted ids (the last
    entry of a partial chunk gets the prompt's last token: vLLM's padded-batch backup token) and
    `is_multimodal` of the shifted ids (by position; not set for a visual run that starts right
    after the chunk, whose encoder output does not exist yet)."""
    shifted = torch.cat([prompt[1:], torch.tensor([next_token])])[a:b].clone()
    visual = torch.isin(prompt, torch.tensor(RULE.placeholder_ids))
    is_mm = torch.cat([visual[1:], torch.tensor([False])])[a:b].clone()
    if b < prompt.numel():
        shifted[-1] = prompt[-1]
        if bool(visual[b]) and not bool(visual[b - 1]):
            is_mm[-1] = False
    return shifted, is_mm


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

    def forward(self, chunks: dict[int, tuple], chain_step: int = 0) -> dict[int, torch.Tensor]:
        """chunks: request -> (shifted ids, features[, is_multimodal]). `chain_step` s >= 1: the
        s-th chain step after the committed entries (vLLM counts it in seq_lens only for it)."""
        rows = sorted(chunks)
        tokens = torch.cat([chunks[r][0] for r in rows])
        features = torch.cat([chunks[r][1] for r in rows])
        is_mm = torch.cat([chunks[r][2] for r in rows]) if len(chunks[rows[0]]) > 2 else None
        qsl = torch.tensor([0] + [chunks[r][0].numel() for r in rows]).cumsum(0)
        if not chain_step:
            for r in rows:
                self.lengths[r] += chunks[r][0].numel()
        batch = PagedBatch(qsl, torch.tensor([self.lengths[r] + chain_step for r in rows]), self.block_table[rows], BLOCK)
        rule = VisualRule(RULE.placeholder_ids, RULE.text_after_visual_id, RULE.run_start_id,
                          keep_visual=self.draft.config.visual_kv)
        hidden = draft_forward(self.draft, self.store, batch, tokens, features, rule, is_mm)
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
    # chunk edges: inside the video (0: 7, 12), right after <|vision_start|> (1: 6), in the text (1: 18)
    cuts = [(0, 7, 12, prompts[0].numel()), (0, 6, 13, prompts[1].numel())]
    hidden = [[], []]
    for step in range(3):
        chunks = {}
        for r in range(2):
            if step + 1 < len(cuts[r]):
                a, b = cuts[r][step], cuts[r][step + 1]
                chunks[r] = (*proposer_inputs(prompts[r], next_tokens[r], a, b)[:1], features[r][a:b],
                             proposer_inputs(prompts[r], next_tokens[r], a, b)[1])
        for r, h in vllm.forward(chunks).items():
            hidden[r].append(h)
    backups = [[b - 1 for b in cut[1:-1]] for cut in cuts]
    for r in range(2):
        order, ref_hidden, _ = engine_reference(draft, prompts[r], features[r], next_tokens[r], backups[r])
        all_hidden = torch.cat(hidden[r])
        torch.testing.assert_close(all_hidden[order[order >= 0]], ref_hidden, rtol=1e-5, atol=1e-5)
        visual = torch.isin(prompts[r], torch.tensor(RULE.placeholder_ids))
        assert visual_kv or not bool(all_hidden[visual].any()), "no visual entry is drafted"
        assert torch.isfinite(all_hidden).all()

    # two chain steps (vLLM's draft loop) == the engine's draft_step along one branch
    prev = {r: torch.cat(hidden[r])[-1:] for r in range(2)}
    ref_prev = {}
    caches = {}
    for r in range(2):
        _, ref_hidden, caches[r] = engine_reference(draft, prompts[r], features[r], next_tokens[r], backups[r])
        ref_prev[r] = ref_hidden[-1:]
    for depth, tokens in enumerate(([3, 4], [5, 6]), start=1):
        out = vllm.forward({r: (torch.tensor([tokens[r]]), prev[r]) for r in range(2)}, chain_step=depth)
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
    visual = torch.isin(p, torch.tensor(RULE.placeholder_ids))
    poisoned = torch.where(visual[:, None], 1e4 * torch.randn_like(features), features)
    outs = []
    for feats, poison in ((features, False), (poisoned, True)):
        vllm = FakeVllm(draft, 1, 64, poison_visual=poison)
        h = []
        for a, b in ((0, 6), (6, 9), (9, p.numel())):      # edges after <|vision_start|> and inside the video
            shifted, is_mm = proposer_inputs(p, 9, a, b)
            h.append(vllm.forward({0: (shifted, feats[a:b], is_mm)})[0])
        outs.append(torch.cat(h)[~visual])
    assert torch.equal(outs[0], outs[1])


@torch.no_grad()
def test_chain_steps_after_a_chunk_that_stops_before_a_video_draft_nothing():
    """vLLM runs its chain steps after a partial prefill chunk too, over the prompt's next
    positions (and discards them): when those are visual, every step is skipped."""
    draft = make_draft(6, 3)
    p = prompt(8, 4)
    vllm = FakeVllm(draft, 1, 64, poison_visual=True)
    shifted, is_mm = proposer_inputs(p, 9, 0, 6)                      # ends at <|vision_start|>
    vllm.forward({0: (shifted, torch.randn(6, H), is_mm)})
    for step in range(2):                                               # positions 6, 7: video
        out = vllm.forward({0: (torch.tensor([3 + step]), 1e4 * torch.randn(1, H))}, chain_step=step + 1)[0]
        assert not bool(out.any())
    shifted, is_mm = proposer_inputs(p, 9, 6, p.numel())               # the rest of the prompt
    rest = vllm.forward({0: (shifted, torch.randn(p.numel() - 6, H), is_mm)})[0]
    assert torch.isfinite(rest).all() and bool(rest[-1].any())


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

