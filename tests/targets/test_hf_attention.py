"""The "sparrow" transformers attention implementation (sparrow_kernels/targets/hf_attention.py)
against transformers' own "sdpa" on the same stock models and weights: the mask function's
structure and its fallbacks, the attention function per pattern, prefill / decode / tree
verification / generate() / the engine on tiny Qwen2.5-VL and LLaVA-OneVision (batch 2, ragged,
GQA 3, head dims 16 and 24, odd layer count), bf16 with an error bound taken from SDPA's own.
"""
from __future__ import annotations

import contextlib
import copy
import subprocess
import sys

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, and_masks, causal_mask_function, sdpa_mask

import sparrow_kernels
from sparrow_kernels.speculative.engine import SparrowGenerator, autoregressive_generate
from sparrow_kernels.speculative.tree import TreeShape
from sparrow_kernels.targets import hf_attention
from sparrow_kernels.targets.hf_attention import WindowAttnMask, attention_route, tree_mask_structure, window_attn_mask
from sparrow_kernels.targets.hf_common import tree_attention_mask
from sparrow_kernels.targets.hf_llava import LlavaOneVisionTarget
from sparrow_kernels.targets.hf_qwen import QwenVLTarget
from tests.speculative.helpers import oracle_for, random_draft
from tests.targets.hf_cases import (
    SIZES,
    TOL,
    ancestor_mask,
    check_tree_matches_paths,
    depths,
    random_parents,
    random_prompt,
    speculative_walk,
    stock_generate,
)

ADAPTERS = {"qwen": QwenVLTarget, "llava": LlavaOneVisionTarget}
_BUILT: dict = {}


def target_for(kind: str, sizes: str, dtype=torch.float32):
    """One tiny random model per (adapter, sizes, dtype); the attention implementation is switched
    on the same weights with `use_attn`."""
    key = (kind, sizes, dtype)
    if key not in _BUILT:
        _BUILT[key] = ADAPTERS[kind].tiny_random(seed=0, dtype=dtype, **SIZES[sizes])
    return _BUILT[key]


@contextlib.contextmanager
def use_attn(target, name: str):
    before = target.model.config._attn_implementation
    target.model.set_attn_implementation(name)
    try:
        yield target
    finally:
        target.model.set_attn_implementation(before)


@contextlib.contextmanager
def count_op_calls():
    """Counts `window_attn` calls made by the attention function (each call's Tq recorded)."""
    calls: list[int] = []
    real = hf_attention.ops.window_attn

    def counting(q, *args, **kwargs):
        calls.append(q.shape[2])
        return real(q, *args, **kwargs)

    hf_attention.ops.window_attn = counting
    try:
        yield calls
    finally:
        hf_attention.ops.window_attn = real


def two_prompts(target):
    return [random_prompt(target, frames=2, suffix=3, seed=1), random_prompt(target, frames=4, suffix=6, seed=2)]


def random_tree_batch(batch: int, nodes: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    parents = [random_parents(nodes, gen) for _ in range(batch)]
    mask = torch.stack([ancestor_mask(p) for p in parents])  # [B, N, N]
    depth = torch.stack([depths(p) for p in parents])  # [B, N]
    tokens = torch.randint(0, 50, (batch, nodes), generator=gen)
    return tokens, mask, depth


# ----------------------------------------------------------------------------- registration
def test_registered_with_transformers():
    assert AttentionInterface._global_mapping["sparrow"] is hf_attention.sparrow_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sparrow"] is hf_attention.window_attn_mask


def test_import_sparrow_kernels_alone_registers_when_transformers_loads_later():
    code = ("import sys, sparrow_kernels\n"
            "assert 'transformers.modeling_utils' not in sys.modules  # the package import stays light\n"
            "from transformers import AttentionInterface, Qwen2Config\n"
            "from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS\n"
            "assert 'sparrow' in AttentionInterface._global_mapping\n"
            "assert 'sparrow' in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_tiny_configs_and_from_pretrained_default_to_sparrow(tmp_path):
    for cls in ADAPTERS.values():
        config = cls.tiny_config()
        assert {config._attn_implementation, config.get_text_config()._attn_implementation,
                config.vision_config._attn_implementation} == {"sparrow"}
    target = target_for("llava", "odd-layers-gqa3-hd16")
    target.model.save_pretrained(tmp_path)
    assert LlavaOneVisionTarget.from_pretrained(tmp_path).model.config._attn_implementation == "sparrow"
    chosen = LlavaOneVisionTarget.from_pretrained(tmp_path, attn_implementation="eager")
    assert chosen.model.config.get_text_config()._attn_implementation == "eager"


# ----------------------------------------------------------------------------- mask function
def test_mask_function_structure_for_causal_and_right_padding():
    out = window_attn_mask(batch_size=2, q_length=3, kv_length=7, q_offset=4)
    assert isinstance(out, WindowAttnMask) and out.tree_mask is None
    assert out.kv_len.tolist() == [7, 7] and out.q_pos.tolist() == [[4, 5, 6]] * 2
    padding = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)  # right padding
    out = window_attn_mask(batch_size=2, q_length=6, kv_length=6, attention_mask=padding)
    assert isinstance(out, WindowAttnMask) and out.kv_len.tolist() == [5, 6] and out.sdpa_is_causal is None
    expected = sdpa_mask(batch_size=2, q_length=6, kv_length=6, attention_mask=padding, allow_is_causal_skip=False)
    assert torch.equal(out.dense(6), expected)
    # no padding: SDPA may take is_causal instead of a mask (prefill) or no mask at all (decode)
    assert window_attn_mask(batch_size=1, q_length=5, kv_length=5).sdpa_is_causal is True
    assert window_attn_mask(batch_size=1, q_length=1, kv_length=5, q_offset=4).sdpa_is_causal is False


@pytest.mark.parametrize("case", ["left-padding", "hole", "empty-row", "composed"])
def test_mask_function_falls_back_to_the_sdpa_mask(case):
    padding = {"left-padding": [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], "hole": [[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]],
               "empty-row": [[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], "composed": [[1] * 5, [1] * 5]}[case]
    args = dict(batch_size=2, q_length=2, kv_length=5, q_offset=3,
                attention_mask=torch.tensor(padding, dtype=torch.bool), allow_is_causal_skip=False)
    if case == "composed":  # e.g. an image-token overlay: the pattern is not the plain causal one
        args["mask_function"] = and_masks(causal_mask_function, lambda b, h, q, kv: kv != 1)
    out = window_attn_mask(**args)
    assert isinstance(out, torch.Tensor) and torch.equal(out, sdpa_mask(**args))


def test_tree_structure_dense_mask_equals_the_adapters_float_mask():
    tokens, mask, depth = random_tree_batch(2, 7, seed=5)
    lengths = torch.tensor([9, 12])
    structure = tree_mask_structure(lengths, 12, mask)
    float_mask = tree_attention_mask(lengths, 12, mask, torch.float32)  # [B, 1, N, S+N]
    assert torch.equal(structure.dense(19), float_mask == 0)


# ----------------------------------------------------------------------------- attention function
class _Module(torch.nn.Module):
    def __init__(self, groups: int, is_causal: bool = True):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, is_causal


def _structures(batch: int, queries: int, keys: int, gen: torch.Generator) -> dict:
    kv_len = torch.tensor([keys - 3, keys])[:batch]
    tree = torch.stack([ancestor_mask(random_parents(queries, gen)) for _ in range(batch)])
    return {
        "causal-cached": WindowAttnMask(kv_len=torch.full((batch,), keys), key_slots=keys,
                                        q_pos=(torch.arange(queries) + keys - queries)[None].repeat(batch, 1)),
        "right-padded": WindowAttnMask(kv_len=kv_len, key_slots=keys,
                                       q_pos=(torch.arange(queries) + keys - queries)[None].repeat(batch, 1)),
        "tree": tree_mask_structure(kv_len - queries, keys - queries, tree),
        "bidirectional-padded": WindowAttnMask(kv_len=kv_len, key_slots=keys,
                                               q_pos=torch.full((batch, queries), keys - 1)),
    }


@pytest.mark.parametrize("head_dim, heads, kv_heads", [(16, 3, 1), (24, 6, 2)])
def test_attention_function_equals_sdpa_with_the_dense_mask(head_dim, heads, kv_heads):
    gen = torch.Generator().manual_seed(0)
    batch, queries, keys = 2, 5, 23
    q = torch.randn(batch, heads, queries, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, keys, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, keys, head_dim, generator=gen)
    module = _Module(heads // kv_heads)
    for name, structure in _structures(batch, queries, keys, gen).items():
        expected, _ = sdpa_attention_forward(module, q, k, v, structure.dense(keys), scaling=0.3)
        with count_op_calls() as calls, attention_route("op"):
            got, weights = hf_attention.sparrow_attention_forward(module, q, k, v, structure, scaling=0.3)
        assert calls == [queries] and weights is None, name
        assert got.shape == (batch, queries, heads, head_dim)
        valid = structure.dense(keys)[:, 0].any(-1)  # [B, Tq]: rows with a visible key
        torch.testing.assert_close(got[valid], expected[valid], **TOL, msg=name)
    # no mask: SDPA's own reading of is_causal (upper-left causal / every key), through the op
    for causal in (True, False):
        square_k, square_v = k[:, :, :queries], v[:, :, :queries]
        expected, _ = sdpa_attention_forward(_Module(heads // kv_heads, causal), q, square_k, square_v, None)
        with count_op_calls() as calls, attention_route("op"):
            got, _ = hf_attention.sparrow_attention_forward(_Module(heads // kv_heads, causal), q, square_k,
                                                            square_v, None)
        assert calls == [queries]
        torch.testing.assert_close(got, expected, **TOL)


def test_attention_function_routes():
    gen = torch.Generator().manual_seed(1)
    module = _Module(3)
    q, k, v = torch.randn(1, 3, 4, 16, generator=gen), torch.randn(1, 1, 40, 16, generator=gen), \
        torch.randn(1, 1, 40, 16, generator=gen)
    structure = window_attn_mask(batch_size=1, q_length=4, kv_length=40, q_offset=36)
    with count_op_calls() as calls:
        hf_attention.sparrow_attention_forward(module, q, k, v, structure)          # auto: few queries over a cache
        with attention_route("sdpa"):
            hf_attention.sparrow_attention_forward(module, q, k, v, structure)
        long_q = torch.randn(1, 3, 40, 16, generator=gen)                           # auto: prefill -> SDPA
        hf_attention.sparrow_attention_forward(module, long_q, k, v, window_attn_mask(1, 40, 40))
        dense = sdpa_mask(1, 4, 40, q_offset=36, allow_is_causal_skip=False)        # a dense mask -> SDPA
        hf_attention.sparrow_attention_forward(module, q, k, v, dense)
        with sparrow_kernels.use_backend("cuda"):                                   # no backend here -> SDPA
            expected, _ = sdpa_attention_forward(module, q, k, v, structure.dense(40))
            got, _ = hf_attention.sparrow_attention_forward(module, q, k, v, structure)
            torch.testing.assert_close(got, expected, **TOL)
        module.train()                                                              # dropout -> SDPA
        hf_attention.sparrow_attention_forward(module, q, k, v, structure, dropout=0.5)
    assert calls == [4]
    with pytest.raises(ValueError, match="built for 40 key slots .* this layer has 39 key slots"):
        hf_attention.sparrow_attention_forward(module, q, k[:, :, 1:], v[:, :, 1:], structure)
    with pytest.raises(ValueError, match="route must be one of"):
        with attention_route("flash"):
            pass


# ----------------------------------------------------------------------------- stock models
@pytest.mark.parametrize("sizes", list(SIZES))
@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_prefill_and_tree_verification_match_sdpa(kind, sizes):
    """Batch 2 with different prompt lengths (a right-padded cache): the prefill (vision tower and
    language model through the op under route "op", and the default route) and a random tree per
    row, then a decode step, give sdpa's logits; the op serves every language-model layer."""
    target = target_for(kind, sizes)
    prompts = two_prompts(target)
    layers = [0, target.num_layers]
    with use_attn(target, "sdpa"):
        ref = target.prefill(prompts, layers=layers, capacity=500)
    for route in ("op", "auto"):
        with use_attn(target, "sparrow"), attention_route(route), count_op_calls() as calls:
            got = target.prefill(prompts, layers=layers, capacity=500)
        torch.testing.assert_close(got.logits, ref.logits, **TOL)
        for mine, theirs in zip(got.hidden, ref.hidden):
            torch.testing.assert_close(mine, theirs, **TOL)
        assert (len(calls) > 2 * target.num_layers) == (route == "op")  # vision + language model per row
    tokens, mask, depth = random_tree_batch(2, 6, seed=3)
    with use_attn(target, "sdpa"):
        ref_tree = target.forward_tree(ref.state, tokens, mask, depth, layers)
    with use_attn(target, "sparrow"), count_op_calls() as calls:
        tree = target.forward_tree(got.state, tokens, mask, depth, layers)
    assert calls == [6] * target.num_layers
    torch.testing.assert_close(tree.logits, ref_tree.logits, **TOL)
    torch.testing.assert_close(tree.hidden[-1], ref_tree.hidden[-1], **TOL)
    accept_index, accept_len = torch.tensor([[0, 2, -1], [0, 1, 4]]), torch.tensor([2, 3])
    for state, attn in ((ref.state, "sdpa"), (got.state, "sparrow")):
        with use_attn(target, attn):
            target.commit(state, accept_index.clone(), accept_len.clone())
    one = dict(tokens=torch.tensor([[5], [7]]), tree_mask=torch.ones(2, 1, 1, dtype=torch.bool),
               depth=torch.zeros(2, 1, dtype=torch.long), layers=[])
    with use_attn(target, "sdpa"):
        ref_step = target.forward_tree(ref.state, **one)
    with use_attn(target, "sparrow"), count_op_calls() as calls:
        step = target.forward_tree(got.state, **one)
    assert calls == [1] * target.num_layers
    torch.testing.assert_close(step.logits, ref_step.logits, **TOL)


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_tree_nodes_equal_their_paths_under_sparrow(kind):
    """Every tree node's logits and hidden states equal the stock model's plain forward over its
    root-to-node path (the adapter-level exactness check of hf_cases, now under "sparrow")."""
    target = target_for(kind, "gqa3-hd24")
    gen = torch.Generator().manual_seed(7)
    with use_attn(target, "sparrow"):
        check_tree_matches_paths(target, random_prompt(target, frames=2, suffix=4, seed=3),
                                 random_parents(7, gen), seed=7)


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_generate_and_speculative_walk_match_sdpa(kind):
    """Stock generate(do_sample=False) gives the same tokens (and logits to float32 rounding)
    under both implementations, decoding through the op; a walk over decoy trees with batch 2
    under "sparrow" reproduces sdpa's generate() logits at every accepted node."""
    target = target_for(kind, "odd-layers-gqa3-hd16")
    prompts = two_prompts(target)
    with use_attn(target, "sdpa"):
        references = [stock_generate(target, p, 8, with_logits=True) for p in prompts]
    with use_attn(target, "sparrow"), count_op_calls() as calls:
        mine = [stock_generate(target, p, 8, with_logits=True) for p in prompts]
    assert calls.count(1) == 2 * 7 * target.num_layers  # every decode step of every layer
    for (tokens, logits), (ref_tokens, ref_logits) in zip(mine, references):
        assert tokens == ref_tokens
        torch.testing.assert_close(logits, ref_logits, **TOL)
    with use_attn(target, "sparrow"):
        walked = speculative_walk(target, prompts, references, seed=4)
    assert walked == [tokens for tokens, _ in references]


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_padded_batches_through_the_stock_forward(kind):
    """model(input_ids [2, T], attention_mask 2-D) with no cache: right padding is a structure the
    op takes; left padding is not, and goes to SDPA with sdpa's own mask. Both equal "sdpa"."""
    target = target_for(kind, "gqa3-hd24")
    lm = target.model.model.language_model
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    for side, uses_op in (("right", True), ("left", False)):
        mask = torch.ones(2, 9, dtype=torch.long)
        if side == "right":
            mask[0, 6:] = 0
        else:
            mask[0, :3] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if kind == "qwen":
            positions = positions[None].expand(3, -1, -1)
        with use_attn(target, "sdpa"), torch.no_grad():
            ref = lm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
        with use_attn(target, "sparrow"), attention_route("op"), count_op_calls() as calls, torch.no_grad():
            got = lm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
        assert bool(calls) == uses_op, side
        valid = mask.bool()
        torch.testing.assert_close(got[valid], ref[valid], **TOL)


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_engine_greedy_equals_plain_greedy_under_both(kind):
    target = target_for(kind, "odd-layers-gqa3-hd16")
    prompts = two_prompts(target)
    max_new, capacity, tree = 8, 400, TreeShape(total_tokens=6, depth=3, top_k=2)
    outputs = {}
    for attn in ("sdpa", "sparrow"):
        with use_attn(target, attn):
            plain = autoregressive_generate(target, prompts, max_new, eos_token_ids=[], capacity=capacity).tokens
            # the Python draft phase: this test is about the target's attention, not the compiled draft
            spec = SparrowGenerator(target, random_draft(target, seed=3), tree, fast_draft=False)
            assert spec.generate(prompts, max_new, eos_token_ids=[], capacity=capacity).tokens == plain
            oracle = SparrowGenerator(target, oracle_for(target, prompts, max_new), tree, fast_draft=False)
            assert oracle.generate(prompts, max_new, eos_token_ids=[], capacity=capacity).tokens == plain
            outputs[attn] = plain
    assert outputs["sparrow"] == outputs["sdpa"]


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_bf16_tree_verification_error_bounded_by_sdpa_error(kind):
    """bf16 weights and activations: the tree logits under "sparrow" are at most about as far
    from an fp32 run of the same (bf16-exact) weights as sdpa's bf16 logits are (FlashAttention
    test rule: at most 2x the low-precision reference's own error, plus one bf16 ulp of slack)."""
    target = target_for(kind, "gqa3-hd24", torch.bfloat16)
    exact = copy.deepcopy(target)
    exact.model.float()
    prompts = two_prompts(target)
    tokens, mask, depth = random_tree_batch(2, 6, seed=9)
    logits = {}
    one = (tokens[:, :1], torch.ones(2, 1, 1, dtype=torch.bool), torch.zeros(2, 1, dtype=torch.long))
    for name, tgt, attn in (("fp32", exact, "sdpa"), ("sdpa", target, "sdpa"), ("sparrow", target, "sparrow")):
        with use_attn(tgt, attn):
            state = tgt.prefill(prompts, layers=[], capacity=500).state
            tree = tgt.forward_tree(state, tokens, mask, depth, layers=[]).logits.float()
            decode = tgt.forward_tree(state, *one, layers=[]).logits.float()  # the same state, a decode step
            logits[name] = torch.cat([tree, decode], 1)  # [B, N + 1, V]
    sdpa_error = (logits["sdpa"] - logits["fp32"]).abs().amax(-1)  # [B, N + 1]
    sparrow_error = (logits["sparrow"] - logits["fp32"]).abs().amax(-1)
    ulp = logits["fp32"].abs().max() * 2.0 ** -8
    assert bool((sparrow_error <= 2 * sdpa_error.max() + ulp).all()), (sparrow_error, sdpa_error)
