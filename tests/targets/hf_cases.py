"""Checks shared by the HF adapter tests (test_hf_qwen.py, test_hf_llava.py): random trees,
the stock model's own forward/generate as ground truth, and the compaction walk. Holds no
test functions; every check compares an adapter against the unmodified transformers model.
"""
from __future__ import annotations

import torch

from sparrow_kernels.targets.base import VideoPrompt

TOL = dict(rtol=1e-4, atol=1e-4)  # float32, same weights, different attention masking/order only

# tiny random configs both adapters are tested on (odd layer count, GQA 3:1, head dims 16/24)
SIZES = {
    "odd-layers-gqa3-hd16": dict(num_layers=3, num_heads=3, num_kv_heads=1, head_dim=16),
    "gqa3-hd24": dict(num_layers=2, num_heads=6, num_kv_heads=2, head_dim=24),
}
_TARGETS: dict = {}


def tiny_target(cls, attn: str = "sdpa", sizes: str = "odd-layers-gqa3-hd16", seed: int = 0):
    """`cls.tiny_random(...)` built once per (adapter, attention implementation, sizes, seed)."""
    key = (cls, attn, sizes, seed)
    if key not in _TARGETS:
        _TARGETS[key] = cls.tiny_random(seed=seed, attn_implementation=attn, **SIZES[sizes])
    return _TARGETS[key]


def random_frames(count: int, height: int, width: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, height, width, 3), dtype=torch.uint8, generator=gen)  # [T, H, W, 3]


def random_prompt(target, frames: int, suffix: int, seed: int, size=(56, 56)) -> VideoPrompt:
    gen = torch.Generator().manual_seed(seed + 1)
    text_vocab = min(target.video_token_id, target.image_token_id) - 1  # ids below the special tokens
    ids = torch.randint(0, text_vocab, (suffix,), generator=gen)
    return VideoPrompt(frames=random_frames(frames, *size, seed=seed), prompt_ids=ids)


def random_parents(nodes: int, gen: torch.Generator) -> list[int]:
    """parents[0] = -1 (root), parents[i] < i."""
    return [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, nodes)]


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    nodes = len(parents)
    mask = torch.zeros(nodes, nodes, dtype=torch.bool)  # [N, N]
    for i in range(nodes):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return mask


def depths(parents: list[int]) -> torch.Tensor:
    out = []
    for i, p in enumerate(parents):
        out.append(0 if p < 0 else out[p] + 1)
    return torch.tensor(out, dtype=torch.long)


def path_to(parents: list[int], node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def stock_forward(target, prompt: VideoPrompt, extra_tokens: list[int]):
    """The unmodified model on prompt + extra text tokens in one plain forward (no cache, no
    positions given: the model derives them itself). Returns (last logits [V], hidden tuple)."""
    kwargs = dict(target._row_inputs(prompt, 0).model_kwargs)
    extra = torch.tensor([extra_tokens], dtype=torch.long)
    kwargs["input_ids"] = torch.cat([kwargs["input_ids"], extra], 1)
    if "mm_token_type_ids" in kwargs:
        kwargs["mm_token_type_ids"] = torch.cat([kwargs["mm_token_type_ids"], torch.zeros_like(extra)], 1)
    if hasattr(target.model.model, "rope_deltas"):
        target.model.model.rope_deltas = None  # stale deltas from an earlier call must not leak in
    with torch.no_grad():
        out = target.model(**kwargs, use_cache=False, output_hidden_states=True)
    return out.logits[0, -1], out.hidden_states


def stock_generate(target, prompt: VideoPrompt, max_new_tokens: int, eos_token_id=None,
                   with_logits: bool = False):
    """`generate(do_sample=False)` of the unmodified model on the same inputs: the new tokens,
    and with `with_logits` also the raw logits of every step `[M, V]` (row j predicts token j)."""
    kwargs = dict(target._row_inputs(prompt, 0).model_kwargs)
    if hasattr(target.model.model, "rope_deltas"):
        target.model.model.rope_deltas = None
    with torch.no_grad():
        out = target.model.generate(**kwargs, attention_mask=torch.ones_like(kwargs["input_ids"]), do_sample=False,
                                    max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=eos_token_id,
                                    pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    tokens = out.sequences[0, kwargs["input_ids"].shape[1]:].tolist()
    if with_logits:
        return tokens, torch.cat(out.logits, 0)
    return tokens


def check_tree_matches_paths(target, prompt: VideoPrompt, parents: list[int], seed: int, warmup: int = 2) -> None:
    """Commit `warmup` greedy tokens as a chain, then forward a random tree: every node's
    logits and hidden states equal the stock model's plain forward over prompt + committed
    tokens + the node's root-to-node path."""
    num_layers = target.num_layers
    layers = sorted({0, num_layers // 2, num_layers})
    pre = target.prefill([prompt], layers=layers, capacity=1000)
    state = pre.state
    committed = [int(pre.logits[0].argmax())]
    # the prefill itself: logits and hidden states at the prompt positions
    ref_logits, ref_hidden = stock_forward(target, prompt, [])
    torch.testing.assert_close(pre.logits[0], ref_logits, **TOL)
    for slot, layer in enumerate(layers):
        if layer < num_layers:
            torch.testing.assert_close(pre.hidden[slot][0], ref_hidden[layer][0], **TOL)
    torch.testing.assert_close(target.lm_head()(pre.hidden[-1][0, -1]), ref_logits, **TOL)
    # a committed chain of `warmup` generated tokens (root = last emitted token)
    if warmup:
        chain = [committed[-1]] + [int(t) for t in torch.randint(0, 50, (warmup - 1,),
                                                                 generator=torch.Generator().manual_seed(seed))]
        nodes = len(chain)
        out = target.forward_tree(state, torch.tensor([chain]), torch.ones(1, nodes, nodes).tril().bool(),
                                  torch.arange(nodes)[None], layers=[])
        target.commit(state, torch.arange(nodes)[None], torch.tensor([nodes]))
        committed = chain + [int(out.logits[0, -1].argmax())]
    gen = torch.Generator().manual_seed(seed)
    tokens = [committed[-1]] + torch.randint(0, 50, (len(parents) - 1,), generator=gen).tolist()
    out = target.forward_tree(state, torch.tensor([tokens]), ancestor_mask(parents)[None], depths(parents)[None],
                              layers=layers)
    assert out.logits.shape == (1, len(parents), target.vocab_size)
    for node in range(len(parents)):
        path_tokens = committed[:-1] + [tokens[i] for i in path_to(parents, node)]
        ref_logits, ref_hidden = stock_forward(target, prompt, path_tokens)
        torch.testing.assert_close(out.logits[0, node], ref_logits, **TOL)
        for slot, layer in enumerate(layers):
            if layer < num_layers:
                torch.testing.assert_close(out.hidden[slot][0, node], ref_hidden[layer][0, -1], **TOL)
        torch.testing.assert_close(target.lm_head()(out.hidden[-1][0, node]), ref_logits, **TOL)


def speculative_walk(target, prompts: list[VideoPrompt], references: list[tuple[list[int], torch.Tensor]],
                     seed: int) -> list[list[int]]:
    """Decode with hand-made draft trees in which the reference continuation sits on a
    non-first branch among decoys, verify greedily with the target's own argmax, commit with
    kv_compact. `references[b]` = (tokens, logits [M, V]) of stock generate: the logits at
    every accepted node must equal the stock logits of that step (so a wrong cache shows up
    even where it does not flip an argmax). Returns the emitted tokens per row."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(prompts)
    max_new = min(len(tokens) for tokens, _ in references)
    pre = target.prefill(prompts, layers=[], capacity=4096)
    state = pre.state
    for b in range(batch):
        torch.testing.assert_close(pre.logits[b], references[b][1][0], **TOL)
    emitted = [[int(t)] for t in pre.logits.argmax(-1)]
    while min(len(e) for e in emitted) < max_new:
        trees = []
        for b in range(batch):
            done = len(emitted[b])
            truth = references[b][0][done:done + 3]
            depth_true = int(torch.randint(0, len(truth) + 1, (1,), generator=gen))  # true tokens in the tree
            trees.append(_decoy_tree(emitted[b][-1], truth[:depth_true], gen))
        nodes = max(len(t[0]) for t in trees)
        tokens = torch.zeros(batch, nodes, dtype=torch.long)
        mask = torch.eye(nodes, dtype=torch.bool).repeat(batch, 1, 1)
        depth = torch.zeros(batch, nodes, dtype=torch.long)
        for b, (toks, parents) in enumerate(trees):
            tokens[b, :len(toks)] = torch.tensor(toks)
            mask[b, :len(toks), :len(toks)] = ancestor_mask(parents)
            depth[b, :len(toks)] = depths(parents)
            mask[b, len(toks):, 0] = True  # padding nodes: leaves under the root, never accepted
            depth[b, len(toks):] = 1
        out = target.forward_tree(state, tokens, mask, depth, layers=[])
        predict = out.logits.argmax(-1)  # [B, N]
        accept_index = torch.full((batch, nodes), -1, dtype=torch.long)
        accept_len = torch.zeros(batch, dtype=torch.long)
        for b, (toks, parents) in enumerate(trees):
            path, cur = [0], 0
            while True:
                child = next((c for c in range(len(toks)) if parents[c] == cur and toks[c] == int(predict[b, cur])),
                             None)
                if child is None:
                    break
                path.append(child)
                cur = child
            done = len(emitted[b])
            ref_logits = references[b][1]
            for k, node in enumerate(path):
                if done + k < ref_logits.shape[0]:
                    torch.testing.assert_close(out.logits[b, node], ref_logits[done + k], **TOL)
            accept_index[b, :len(path)] = torch.tensor(path)
            accept_len[b] = len(path)
            emitted[b] += [toks[c] for c in path[1:]] + [int(predict[b, cur])]
        target.commit(state, accept_index, accept_len)
        assert torch.equal(state.lengths, pre.lengths + torch.tensor([len(e) - 1 for e in emitted]))
    return [e[:max_new] for e in emitted]


def _decoy_tree(root: int, truth: list[int], gen: torch.Generator) -> tuple[list[int], list[int]]:
    """Root, then at each depth a decoy child first and the true child second (so accepted node
    indices are not contiguous), plus a decoy grandchild under each decoy."""
    tokens, parents, cur = [root], [-1], 0
    for true_token in truth:
        decoy = (true_token + 1 + int(torch.randint(0, 40, (1,), generator=gen))) % 60
        tokens.append(decoy)
        parents.append(cur)
        decoy_node = len(tokens) - 1
        tokens.append(true_token)
        parents.append(cur)
        cur = len(tokens) - 1
        tokens.append((decoy + 3) % 60)
        parents.append(decoy_node)
    return tokens, parents
