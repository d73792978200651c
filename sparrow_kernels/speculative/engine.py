"""The draft/verify engine: speculative generation for a whole batch (one EAGLE-2 tree per
row, one target forward, lossless greedy or stochastic acceptance, KV compaction), on top of
targets/decoding.py (the request, stop rules, statistics and the plain autoregressive
baseline, re-exported here). It owns no model state: the target owns its cache and positions,
the draft its own cache; acceptance is decided only by the verify ops, never here.
"""
from __future__ import annotations

import functools
from typing import Iterator, Sequence

import torch
from torch import Tensor

from sparrow_kernels import ops
from sparrow_kernels.speculative.draft_base import Draft, DraftRunner
from sparrow_kernels.speculative.draft_inputs import kept_mask, kept_positions, open_entries
from sparrow_kernels.speculative.runner import draft_runner
from sparrow_kernels.speculative.tree import GPU_TREE, DraftTree, TreeShape, proposal_vocab_size
from sparrow_kernels.targets.base import PrefillOutput, Target, VideoPrompt
from sparrow_kernels.targets.decoding import (DEFAULT_MAX_CONTEXT, GenerationRequest, GenerationResult, GenerationStats,
                                              Session, StreamChunk, autoregressive_generate, check_room,
                                              kv_capacity, make_generator, next_tokens, request_capacity,
                                              sample_from_probs, sampling_probs)

# ----------------------------------------------------------------------------- draft inputs
def draft_prompt_entries(prefill: PrefillOutput, first_tokens: Tensor,
                         visual_kv: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Which prompt positions enter the draft cache, with the EAGLE shift (draft_inputs):
    Sparrow (visual_kv=False) keeps the text positions (and always the last prompt position),
    the visual-KV baseline every position; entry j pairs the target feature at the j-th kept
    position with the token at the next kept position, the last entry with `first_tokens [B]`
    (the first generated token). Returns index `[B, P]` (kept prompt positions in order, -1
    padding), tokens `[B, P]` and valid `[B]` (entries per row).
    """
    keep = kept_mask(prefill.text_mask, prefill.lengths, visual_kv)                       # [B, T]
    order, valid = kept_positions(keep)                                                    # [B, P], [B]
    index, tokens = open_entries(order, valid, prefill.input_ids, first_tokens)
    return index, tokens, valid


# ----------------------------------------------------------------------------- the engine
class SparrowGenerator:
    """Speculative generation with a draft (draft_base.Draft) for a target (targets/base.Target).

    Each step, for all rows at once: grow an EAGLE-2 tree of shape `tree` (tree.TreeShape:
    total_tokens nodes incl. the root, depth expansion steps after the root's, top_k children
    per expanded node; top_k = 1 is chain drafting) from the last emitted token, verify it in
    one target forward, keep the accepted path in the target cache, emit the accepted tokens
    + the bonus, and feed the draft the target's own hidden states of the accepted tokens.

    `draft_sampling=True` (used only when temperature > 0) draws the children i.i.d. from the
    draft's tempered distribution and verifies with those draft probabilities (recursive
    rejection sampling); otherwise children are the top-k and verification is target-only.
    Both are lossless. `profile=True` synchronizes CUDA around each timed phase.
    `fast_draft` (default True) lets runner.draft_runner pick the compiled CPU draft phase
    (cpu_draft; the same trees up to float rounding) where it applies, once per call; False
    forces the Python path everywhere (for comparisons).
    """

    def __init__(self, target: Target, draft: Draft, tree: TreeShape = GPU_TREE, *,
                 draft_sampling: bool = False, tokenizer=None, capacity: int | None = None,
                 max_context: int = DEFAULT_MAX_CONTEXT, profile: bool = False, fast_draft: bool = True):
        if not isinstance(tree, TreeShape):
            raise ValueError(f"SparrowGenerator: tree must be a tree.TreeShape (e.g. TreeShape(total_tokens=30, "
                             f"depth=3, top_k=8) or tree.CPU_TREE), got {type(tree).__name__}")
        cfg = draft.config
        if getattr(cfg, "vocab_size", target.vocab_size) != target.vocab_size:
            raise ValueError(f"SparrowGenerator: draft vocab_size={cfg.vocab_size} does not match the "
                             f"target's vocab_size={target.vocab_size}")
        self.target, self.draft = target, draft
        self.tree = tree
        self.draft_sampling = draft_sampling
        self.tokenizer, self.capacity, self.max_context, self.profile = tokenizer, capacity, max_context, profile
        self.fast_draft = fast_draft
        self.feature_layers = tuple(int(l) for l in cfg.feature_layers)
        self.visual_kv = bool(getattr(cfg, "visual_kv", False))
        visual_layer = getattr(cfg, "visual_feature_layer", None)
        self.visual_feature_layer = int(visual_layer) if (visual_layer is not None and self.visual_kv) else None
        extra = () if self.visual_feature_layer is None else (self.visual_feature_layer,)
        self.layers = tuple(dict.fromkeys(self.feature_layers + extra))    # what the target returns
        self._feature_slots = [self.layers.index(l) for l in self.feature_layers]

    # -- public API ---------------------------------------------------------------------
    def generate(self, prompts: Sequence[VideoPrompt], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, eos_token_ids: Sequence[int] | None = None,
                 stop_strings: Sequence[str] | str | None = None, seed: int | None = None,
                 capacity: int | None = None) -> GenerationResult:
        """Generate up to `max_new_tokens` per row. temperature 0 = greedy (token for token the
        target's own greedy output); > 0 samples exactly as plain sampling with the same
        temperature / top_p would. eos_token_ids None = the target's."""
        session = self._session(GenerationRequest(prompts, max_new_tokens, temperature, top_p, eos_token_ids,
                                                  stop_strings, seed, capacity))
        return session.drain(self._run(session))

    def stream(self, prompts: Sequence[VideoPrompt], max_new_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, eos_token_ids: Sequence[int] | None = None,
               stop_strings: Sequence[str] | str | None = None, seed: int | None = None,
               capacity: int | None = None) -> Iterator[StreamChunk]:
        """As generate, but yields a StreamChunk (new tokens per row) as soon as each step's
        tokens are accepted; the first chunk holds the token chosen from the prefill."""
        session = self._session(GenerationRequest(prompts, max_new_tokens, temperature, top_p, eos_token_ids,
                                                  stop_strings, seed, capacity))
        return self._run(session)

    def tree_nodes(self, sampled: bool = False) -> tuple[int, int]:
        """(nodes per verified tree, draft scratch nodes) with these settings."""
        return self.tree.size(proposal_vocab_size(self.draft, self.target.vocab_size), sampled)

    # -- the loop -------------------------------------------------------------------------
    def _session(self, request: GenerationRequest) -> Session:
        return Session(self.target, request, self.tokenizer, self.profile)

    def _sampler(self, temperature: float, top_p: float):
        if temperature == 0 or not self.draft_sampling:
            return None
        return functools.partial(sampling_probs, temperature=temperature, top_p=top_p)

    @torch.inference_mode()
    def _run(self, session: Session) -> Iterator[StreamChunk]:
        request = session.request
        prompts, max_new_tokens, temperature, top_p = (request.prompts, request.max_new_tokens, request.temperature,
                                                       request.top_p)
        if max_new_tokens == 0:
            yield session.chunk([[] for _ in prompts])
            return
        target, draft, clock = self.target, self.draft, session.clock
        device, B = target.device, len(prompts)
        sampler = self._sampler(temperature, top_p)
        nodes, scratch = self.tree_nodes(sampled=sampler is not None)
        capacity = request_capacity(target, request, nodes, self.max_context, default=self.capacity)
        generator = make_generator(device, request.seed)
        runner: DraftRunner = draft_runner(draft, self.tree, sampler=sampler, generator=generator,
                                           compiled=self.fast_draft)         # chosen once per call

        with clock.phase("prefill"):
            prefill = target.prefill(prompts, self.layers, capacity)
            state = prefill.state
            check_room(prefill.lengths, capacity, max_new_tokens, nodes)
            first = next_tokens(prefill.logits, temperature, top_p, generator)             # [B]
        with clock.phase("bookkeeping"):
            emitted = session.emit([[t] for t in first.tolist()])
        yield session.chunk(emitted)
        if not any(session.active):
            return

        with clock.phase("prefill"):      # the draft's own prompt pass belongs to the prefill
            index, entry_tokens, valid = draft_prompt_entries(prefill, first, self.visual_kv)
            # the draft's cache: its prompt entries, every accepted token, one tree's scratch nodes
            cache = draft.new_cache(B, kv_capacity(int(valid.max()), max_new_tokens, nodes + scratch + 1))
            features = self._prompt_features(prefill, index)
            hidden = runner.extend(cache, entry_tokens, features, valid)                   # [B, P, H]
            rows = torch.arange(B, device=device)
            last_hidden = hidden[rows, (valid - 1).clamp(min=0)]                            # [B, H]
        del prefill, hidden, features
        root = first                                                                        # [B]
        zero_draft_probs = None
        while True:
            with clock.phase("draft"):
                tree = runner.build_tree(cache, root, last_hidden)
            with clock.phase("verify"):
                if bool((state.lengths + tree.num_nodes > capacity).any()):
                    raise RuntimeError(f"target KV capacity {capacity} would overflow: lengths "
                                       f"{state.lengths.tolist()} + {tree.num_nodes} tree nodes (nothing was written)")
                out = target.forward_tree(state, tree.tokens, tree.tree_mask, tree.depth, self.layers)
                if temperature == 0:
                    accept_index, accept_len, bonus = ops.tree_verify_greedy(
                        tree.tokens, out.logits.argmax(dim=-1), tree.next_token, tree.next_sibling)
                else:
                    if tree.draft_probs is None and zero_draft_probs is None:
                        zero_draft_probs = torch.zeros(B, tree.num_nodes, out.logits.shape[-1],
                                                       dtype=torch.float32, device=device)
                    accept_index, accept_len, bonus = self._verify_sample(
                        tree, out.logits, temperature, top_p, generator,
                        tree.draft_probs if tree.draft_probs is not None else zero_draft_probs)
            with clock.phase("bookkeeping"):
                session.stats.steps += 1
                was_active = session.active
                path_tokens = tree.tokens.gather(1, accept_index.clamp(min=0))             # [B, N]
                lens, path, extra = accept_len.tolist(), path_tokens.tolist(), bonus.tolist()
                for b in range(B):
                    if was_active[b]:
                        session.stats.accept_lengths[b].append(lens[b])
                emitted = session.emit([path[b][1:lens[b]] + [extra[b]] if was_active[b] else []
                                        for b in range(B)])
                still = torch.tensor(session.active, device=device)                        # [B]
                kept_len = torch.where(still, accept_len, 0)                               # finished rows keep nothing
                target.commit(state, accept_index, kept_len)
            yield session.chunk(emitted)
            if not bool(still.any()):
                return
            with clock.phase("draft"):
                # the accepted path with the EAGLE shift: entry i = the target feature at accepted
                # node i with the next accepted node's token (the bonus after the last one)
                width = int(kept_len.max())
                node_index, path_entry_tokens = open_entries(accept_index[:, :width], kept_len, tree.tokens, bonus)
                features = ops.gather_hidden([out.hidden[i] for i in self._feature_slots], node_index)
                hidden = runner.extend(cache, path_entry_tokens, features, kept_len)       # [B, width, H]
                new_last = hidden[rows, (kept_len - 1).clamp(min=0)]
                last_hidden = torch.where(still[:, None], new_last, last_hidden)
                root = bonus
            del out, hidden, features

    def _prompt_features(self, prefill: PrefillOutput, index: Tensor) -> Tensor:
        """Target features `[B, P, F]` of the chosen prompt positions (visual entries from
        `visual_feature_layer` when the draft config names one)."""
        text_features = ops.gather_hidden([prefill.hidden[i] for i in self._feature_slots], index)
        if self.visual_feature_layer is None:
            return text_features
        visual_hidden = prefill.hidden[self.layers.index(self.visual_feature_layer)]
        visual_features = ops.gather_hidden([visual_hidden] * len(self.feature_layers), index)
        is_visual = ~prefill.text_mask.gather(1, index.clamp(min=0)) & (index >= 0)        # [B, P]
        return torch.where(is_visual[:, :, None], visual_features, text_features)

    @staticmethod
    def _verify_sample(tree: DraftTree, logits: Tensor, temperature: float, top_p: float,
                       generator: torch.Generator, draft_probs: Tensor):
        B, N = tree.tokens.shape
        target_probs = sampling_probs(logits, temperature, top_p).contiguous()             # [B, N, V]
        uniform_accept = torch.rand(B, N, generator=generator, device=logits.device)       # [B, N]
        uniform_final = torch.rand(B, generator=generator, device=logits.device)           # [B]
        return ops.tree_verify_sample(tree.tokens, target_probs, draft_probs, tree.next_token, tree.next_sibling,
                                      uniform_accept, uniform_final)


__all__ = ["DEFAULT_MAX_CONTEXT", "GenerationRequest", "GenerationResult", "GenerationStats", "SparrowGenerator",
           "StreamChunk", "autoregressive_generate", "draft_prompt_entries", "sample_from_probs", "sampling_probs"]
