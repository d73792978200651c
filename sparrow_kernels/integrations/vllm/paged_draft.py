"""A Sparrow draft over vLLM's paged KV cache, text positions only. vLLM's EAGLE proposer runs the
draft over every position of a request (entry i = target feature at i + token i+1) and gives each
position a cache slot; this module keeps the draft's own K/V in those slots for kept positions
only, and runs the project's `SparrowDraft.extend` on the kept new entries with the kept earlier
entries as its cache: visual positions never reach the draft (not their features, not their
tokens, not their keys). It must not import vLLM (tests run it without vLLM).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from sparrow_kernels.speculative.draft import SparrowDraft


@dataclass(frozen=True)
class VisualRule:
    """Which positions are visual and how the EAGLE shift crosses them.

    placeholder_ids: the token ids of visual positions (Qwen2.5-VL: <|image_pad|>, <|video_pad|>).
    text_after_visual_id: the token that always follows a visual run (<|vision_end|>); the kept
        position before a run pairs with it (the next kept token, as in draft_inputs.open_entries).
    run_start_id: the token that always opens a visual run (<|vision_start|>).
    keep_visual: the visual-KV baseline (DraftConfig.visual_kv): every position is kept.
    """

    placeholder_ids: tuple[int, ...]
    text_after_visual_id: int
    run_start_id: int
    keep_visual: bool = False


@dataclass
class PagedBatch:
    """One forward of the proposer, in vLLM's attention-metadata terms: request r owns the
    entries `query_start_loc[r]:query_start_loc[r+1]`, which are its last ones (it holds
    `seq_lens[r]` entries after this forward); entry index j of request r lives in slot
    `block_table[r, j // block_size] * block_size + j % block_size`."""

    query_start_loc: Tensor     # [R + 1]
    seq_lens: Tensor            # [R]
    block_table: Tensor         # [R, max_blocks]
    block_size: int


class PagedStore:
    """The draft's K/V and two flags per vLLM cache slot: `visual_next[s]`, the position after
    the entry in slot s is a visual one (entry j is visual iff `visual_next` of entry j-1 is
    set), and `opens_run_next[s]`, the token after it is `run_start_id`. Keys are stored rotated
    at the entry's text index (RoPE of the draft cache slot the project's engine would use)."""

    def __init__(self, kv_cache: Tensor, num_kv_heads: int, head_dim: int):
        """`kv_cache`: the tensor vLLM allocated for the draft's attention layer. Layouts:
        CPU `[num_blocks, Hkv, block_size, 2 * D]` and flash `[2, num_blocks, block_size, Hkv, D]`."""
        shape = tuple(kv_cache.shape)
        if kv_cache.dim() == 4 and shape[1] == num_kv_heads and shape[3] == 2 * head_dim:
            self.k_blocks, self.v_blocks = kv_cache[..., :head_dim], kv_cache[..., head_dim:]
            self.head_major = True                               # [nb, Hkv, bs, D]
            num_blocks, block_size = shape[0], shape[2]
        elif kv_cache.dim() == 5 and shape[0] == 2 and shape[3] == num_kv_heads and shape[4] == head_dim:
            self.k_blocks, self.v_blocks = kv_cache[0], kv_cache[1]
            self.head_major = False                              # [nb, bs, Hkv, D]
            num_blocks, block_size = shape[1], shape[2]
        else:
            raise ValueError(f"PagedStore: kv_cache of shape {list(shape)} is neither the CPU layout "
                             f"[blocks, {num_kv_heads}, block_size, {2 * head_dim}] nor the flash layout "
                             f"[2, blocks, block_size, {num_kv_heads}, {head_dim}]")
        self.block_size = block_size
        self.visual_next = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=kv_cache.device)
        self.opens_run_next = torch.zeros_like(self.visual_next)

    def _where(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        return slots // self.block_size, slots % self.block_size

    def read(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        """K, V of `slots [N]`: each `[N, Hkv, D]`."""
        block, offset = self._where(slots)
        if self.head_major:
            return self.k_blocks[block, :, offset], self.v_blocks[block, :, offset]
        return self.k_blocks[block, offset], self.v_blocks[block, offset]

    def write(self, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Store k, v `[N, Hkv, D]` at `slots [N]`."""
        block, offset = self._where(slots)
        if self.head_major:
            self.k_blocks[block, :, offset] = k.to(self.k_blocks.dtype)
            self.v_blocks[block, :, offset] = v.to(self.v_blocks.dtype)
        else:
            self.k_blocks[block, offset] = k.to(self.k_blocks.dtype)
            self.v_blocks[block, offset] = v.to(self.v_blocks.dtype)


def _slots(batch: PagedBatch, row: int, entries: Tensor) -> Tensor:
    """Cache slots of request `row`'s entry indices `entries [N]`."""
    blocks = batch.block_table[row].long()[entries // batch.block_size]
    return blocks * batch.block_size + entries % batch.block_size


def _next_text_tokens(tokens: Tensor, is_visual_token: Tensor, fallback: int) -> Tensor:
    """Each placeholder token of a chunk replaced by the next non-placeholder token after it in
    the chunk (`fallback` when the chunk ends first): the token at the next kept position."""
    n = tokens.shape[0]
    index = torch.arange(n, device=tokens.device)
    candidate = torch.where(is_visual_token, n, index)                                # [n]
    next_text = torch.flip(torch.cummin(torch.flip(candidate, [0]), 0).values, [0])    # first text >= i
    padded = torch.cat([tokens, tokens.new_full((1,), fallback)])
    return padded[next_text]


def draft_forward(draft: SparrowDraft, store: PagedStore, batch: PagedBatch, tokens: Tensor,
                  features: Tensor, rule: VisualRule, next_is_visual: Tensor | None = None) -> Tensor:
    """Commit this forward's entries and return the draft hidden `[N, H]` of each (zeros at
    visual entries, which nothing samples). tokens `[N]`: the shifted ids (entry i's token is
    position i+1's); features `[N, F]`: the target features of the entries' own positions (a
    fed-back draft hidden in chain steps, F = H for the single-layer drafts exported here).
    next_is_visual `[N]` bool: position i+1 is a visual position of the prompt (vLLM's
    `is_multimodal` of the shifted ids, which it derives from the prompt's placeholder ranges,
    not from `tokens`); None: chain steps, whose entries are followed by generated tokens (or,
    after a partial prefill chunk whose next position is visual, are visual themselves).

    vLLM pairs the last entry of a partial prefill chunk with a wrong token, and when a visual
    run starts right after a chunk it cannot mark it yet; the flag of that entry is repaired from
    the next chunk (the entry two back opened a run and the chunk's first entry is followed by a
    visual position or by the run's end)."""
    n_entries = tokens.shape[0]
    device = features.device
    hidden_out = torch.zeros(n_entries, draft.config.hidden_size, dtype=draft.dtype, device=device)
    tokens = tokens.long()
    rows = []   # (start, kept offsets, kept slots, committed text slots, kept tokens)
    qsl = batch.query_start_loc.tolist()
    seq_lens = batch.seq_lens.tolist()
    for r in range(len(seq_lens)):
        start, end = qsl[r], qsl[r + 1]
        n = end - start
        if n <= 0:
            continue
        total = int(seq_lens[r])
        first = total - n                                                # index of the first new entry
        entries = torch.arange(total, device=device)
        slots = _slots(batch, r, entries)                                # [total]
        chunk = tokens[start:end]
        no_flag = torch.zeros_like(chunk, dtype=torch.bool)
        visual_token = no_flag if rule.keep_visual or next_is_visual is None else next_is_visual[start:end].bool()
        store.visual_next[slots[first:]] = visual_token
        store.opens_run_next[slots[first:]] = no_flag if rule.keep_visual else chunk == rule.run_start_id
        if first >= 2 and not rule.keep_visual and bool(store.opens_run_next[slots[first - 2]]) and (
                bool(visual_token[0]) or int(chunk[0]) == rule.text_after_visual_id):
            store.visual_next[slots[first - 1]] = True                   # a run began at this chunk
        is_text = torch.ones(total, dtype=torch.bool, device=device)
        is_text[1:] = ~store.visual_next[slots[:-1]]                     # entry j is visual iff position j is
        if next_is_visual is None and not rule.keep_visual and (
                not bool(is_text[first]) or (first >= 2 and bool(store.opens_run_next[slots[first - 2]]))):
            # a chain step at a visual position: vLLM drafts on after a partial prefill chunk, over
            # the prompt's next positions (and discards the proposals); a run may begin right there
            store.visual_next[slots[first:]] = True
            is_text[first:] = False
        kept_new = is_text[first:].nonzero().flatten()                   # offsets in the chunk
        if kept_new.numel() == 0:
            continue
        chunk_tokens = chunk if rule.keep_visual else _next_text_tokens(chunk, visual_token, rule.text_after_visual_id)
        committed = slots[:first][is_text[:first]]
        rows.append((start, kept_new, slots[first:][kept_new], committed, chunk_tokens[kept_new]))
    if not rows:
        return hidden_out

    B = len(rows)
    T = max(row[1].numel() for row in rows)
    capacity = max(row[3].numel() + row[1].numel() for row in rows)
    cache = draft.new_cache(B, capacity)
    entry_tokens = torch.zeros(B, T, dtype=torch.long, device=device)
    entry_features = torch.zeros(B, T, features.shape[-1], dtype=features.dtype, device=device)
    valid = torch.zeros(B, dtype=torch.long, device=device)
    for b, (start, kept, _, committed, kept_tokens) in enumerate(rows):
        S = committed.numel()
        if S:
            k, v = store.read(committed)                                 # [S, Hkv, D]
            cache.k[b, :, :S] = k.transpose(0, 1).to(cache.k.dtype)
            cache.v[b, :, :S] = v.transpose(0, 1).to(cache.v.dtype)
        cache.lengths[b] = S
        entry_tokens[b, :kept.numel()] = kept_tokens
        entry_features[b, :kept.numel()] = features[start + kept]
        valid[b] = kept.numel()
    lengths_before = cache.lengths.clone()
    hidden = draft.extend(cache, entry_tokens, entry_features, valid)    # [B, T, H]
    for b, (start, kept, kept_slots, _, _) in enumerate(rows):
        S, m = int(lengths_before[b]), kept.numel()
        store.write(kept_slots, cache.k[b, :, S:S + m].transpose(0, 1), cache.v[b, :, S:S + m].transpose(0, 1))
        hidden_out[start + kept] = hidden[b, :m].to(hidden_out.dtype)
    return hidden_out


def visual_rule_for(draft_config, placeholder_ids: Sequence[int], text_after_visual_id: int,
                    run_start_id: int) -> VisualRule:
    """The rule a draft config asks for: text only (Sparrow) or every position (visual_kv)."""
    return VisualRule(tuple(int(t) for t in placeholder_ids), int(text_after_visual_id), int(run_start_id),
                      keep_visual=bool(draft_config.visual_kv))


__all__ = ["PagedBatch", "PagedStore", "VisualRule", "draft_forward", "visual_rule_for"]
