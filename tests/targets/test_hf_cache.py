"""The HF adapters' KV cache (`SlotLayer` in sparrow_kernels/targets/hf_common.py): slots written in
place instead of the stock layer's whole-cache concatenation, growth when full, truncation and
kv_compact on its buffers; decoding through it equals the stock model's generate()."""
from __future__ import annotations

import torch
from transformers import DynamicCache

from sparrow_kernels.targets import hf_common
from sparrow_kernels.targets.hf_common import SlotLayer, compact_cache, new_dynamic_cache
from sparrow_kernels.targets.hf_llava import LlavaOneVisionTarget
from tests.targets.hf_cases import random_prompt, speculative_walk, stock_generate, tiny_target


def test_slot_layer_writes_in_place_and_grows_like_concatenation():
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 3, 5, 8, generator=gen), torch.randn(2, 3, 5, 8, generator=gen)
    layer = SlotLayer(keys, values, capacity=7)
    buffer = layer.key_buffer.data_ptr()
    new_k, new_v = torch.randn(2, 3, 2, 8, generator=gen), torch.randn(2, 3, 2, 8, generator=gen)
    got_k, got_v = layer.update(new_k, new_v)
    assert layer.key_buffer.data_ptr() == buffer and layer.get_seq_length() == 7   # in place: no copy
    assert torch.equal(got_k, torch.cat([keys, new_k], 2)) and torch.equal(got_v, torch.cat([values, new_v], 2))
    more_k, more_v = torch.randn(2, 3, 4, 8, generator=gen), torch.randn(2, 3, 4, 8, generator=gen)
    got_k, got_v = layer.update(more_k, more_v)                                      # full: grows
    assert layer.capacity >= 11 and layer.key_buffer.data_ptr() != buffer
    assert torch.equal(got_k, torch.cat([keys, new_k, more_k], 2))
    assert torch.equal(got_v, torch.cat([values, new_v, more_v], 2))
    layer.keys, layer.values = layer.keys[..., :6, :], layer.values[..., :6, :]      # truncate, then overwrite
    got_k, _ = layer.update(more_k[..., :1, :], more_v[..., :1, :])
    assert torch.equal(got_k, torch.cat([keys, new_k[..., :1, :], more_k[..., :1, :]], 2))


def test_compact_on_slot_buffers_equals_compact_on_plain_tensors():
    gen = torch.Generator().manual_seed(1)
    layer_kv = [(torch.randn(2, 1, 9, 4, generator=gen), torch.randn(2, 1, 9, 4, generator=gen)) for _ in range(2)]
    lengths, accept_index, accept_len = torch.tensor([4, 6]), torch.tensor([[0, 2], [1, -1]]), torch.tensor([2, 1])
    slots = new_dynamic_cache(layer_kv, capacity=12)
    plain = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in layer_kv])  # stock layers
    assert not any(isinstance(layer, SlotLayer) for layer in plain.layers)
    assert compact_cache(slots, lengths, 6, accept_index, accept_len) == 7
    assert compact_cache(plain, lengths, 6, accept_index, accept_len) == 7
    for mine, theirs in zip(slots.layers, plain.layers):
        for b, used in enumerate((lengths + accept_len).tolist()):
            assert torch.equal(mine.keys[b, :, :used], theirs.keys[b, :, :used])
            assert torch.equal(mine.values[b, :, :used], theirs.values[b, :, :used])


def test_decoding_through_growing_slots_equals_stock_generate(monkeypatch):
    """One free slot per (re)allocation: every forward grows the buffers, every commit compacts
    them; the speculative walk (batch 2) still reproduces generate()'s tokens and logits."""
    monkeypatch.setattr(hf_common, "slot_headroom", lambda slots: 1)
    target = tiny_target(LlavaOneVisionTarget, "sparrow")
    prompts = [random_prompt(target, frames=2, suffix=3, seed=1), random_prompt(target, frames=3, suffix=5, seed=2)]
    references = [stock_generate(target, p, 7, with_logits=True) for p in prompts]
    assert speculative_walk(target, prompts, references, seed=5) == [tokens for tokens, _ in references]
