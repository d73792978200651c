"""The draft/verify engine: speculative generation for a whole batch (one EAGLE-2 tree per
row, one target forward, lossless greedy or stochastic acceptance, KV compaction) plus the
plain autoregressive baseline through the same target interface, with per-call statistics.
It owns no model state: the target owns its cache and positions, the draft its own cache;
acceptance is decided only by the verify ops, never here.
"""
from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor

from sparrow_kernels import ops
from sparrow_kernels.draft_base import Draft, DraftRunner
from sparrow_kernels.draft_inputs import kept_mask, kept_positions, open_entries
from sparrow_kernels.runner import draft_runner
from sparrow_kernels.targets.base import PrefillOutput, Target, VideoPrompt
from sparrow_kernels.tree import GPU_TREE, DraftTree, TreeShape

DEFAULT_MAX_CONTEXT = 8192   # prompt tokens reserved per row when the caller gives no capacity


# ----------------------------------------------------------------------------- sampling
def sampling_probs(logits: Tensor, temperature: float, top_p: float = 1.0) -> Tensor:
    """The distribution plain sampling draws from, as HF `generate(do_sample=True)` builds it:
    logits / temperature, then top-p (drop the least likely tokens whose total mass is at most
    1 - top_p, always keeping the most likely one). `[.., V]` -> float32 probabilities `[.., V]`."""
    if temperature <= 0:
        raise ValueError(f"sampling_probs: temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"sampling_probs: top_p must be in (0, 1], got {top_p}")
    scaled = logits.float() / temperature                                                  # [.., V]
    if top_p < 1:
        ascending, order = scaled.sort(dim=-1)                                             # [.., V]
        mass_up_to = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = mass_up_to <= 1 - top_p
        drop[..., -1] = False                                                              # keep the top token
        drop_unsorted = torch.zeros_like(drop).scatter(-1, order, drop)                   # back to vocab order
        scaled = scaled.masked_fill(drop_unsorted, float("-inf"))
    return scaled.softmax(dim=-1)


def sample_from_probs(probs: Tensor, uniform: Tensor) -> Tensor:
    """Inverse-CDF draw, the rule tree_verify_sample uses for its final sample: the first
    token t with cumsum(probs)[t] > uniform * sum(probs) (the last token with mass if
    rounding runs past the end). probs `[B, V]`, uniform `[B]` in [0, 1) -> tokens `[B]`."""
    cdf = probs.cumsum(dim=-1)                                                             # [B, V]
    threshold = (uniform.to(cdf.dtype) * probs.sum(dim=-1))[:, None]                       # [B, 1]
    token = (cdf <= threshold).sum(dim=-1)                                                 # [B]
    last_with_mass = probs.shape[-1] - 1 - (probs > 0).flip(-1).long().argmax(dim=-1)      # [B]
    return torch.minimum(token, last_with_mass)


# ----------------------------------------------------------------------------- results
@dataclass
class GenerationStats:
    """What one generate/stream call did. Times in seconds (time.perf_counter; on CUDA the
    split is exact only with profile=True, which synchronizes around each phase)."""

    batch_size: int
    steps: int = 0                       # verification steps (target forward_tree calls)
    accept_lengths: list[list[int]] = field(default_factory=list)  # per row, per active step: accepted
    #                                      nodes incl. the root = tokens the step yields incl. the bonus
    emitted: list[int] = field(default_factory=list)      # tokens returned per row (after stops)
    prefill_s: float = 0.0               # target prefill + the draft's prompt pass
    draft_s: float = 0.0
    verify_s: float = 0.0
    bookkeeping_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.accept_lengths:
            self.accept_lengths = [[] for _ in range(self.batch_size)]
        if not self.emitted:
            self.emitted = [0] * self.batch_size

    @property
    def tau(self) -> float:
        """Mean tokens per verification step (accepted draft tokens + the bonus), over every
        (row, step) where the row was still generating; 0 before the first step."""
        counts = [n for row in self.accept_lengths for n in row]
        return sum(counts) / len(counts) if counts else 0.0

    @property
    def accepted_per_row(self) -> list[int]:
        """Draft tokens accepted per row (the bonus tokens not counted)."""
        return [sum(n - 1 for n in row) for row in self.accept_lengths]

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.draft_s + self.verify_s + self.bookkeeping_s

    @property
    def decode_s(self) -> float:
        return self.total_s - self.prefill_s

    def as_dict(self) -> dict:
        return {"batch_size": self.batch_size, "steps": self.steps, "tau": self.tau,
                "accepted_per_row": self.accepted_per_row, "emitted": list(self.emitted),
                "prefill_s": self.prefill_s, "draft_s": self.draft_s, "verify_s": self.verify_s,
                "bookkeeping_s": self.bookkeeping_s, "decode_s": self.decode_s, "total_s": self.total_s}


@dataclass
class GenerationResult:
    tokens: list[list[int]]              # generated ids per row (EOS / stop-string token included)
    text: list[str] | None               # decoded rows when a detokenizer is known
    finish_reasons: list[str]            # per row: "eos", "length" or "stop_string"
    stats: GenerationStats


@dataclass
class StreamChunk:
    tokens: list[list[int]]              # tokens accepted this step, per row (empty when none)
    finished: list[bool]                 # per row: no more tokens will come
    stats: GenerationStats               # the running statistics of this call


# ----------------------------------------------------------------------------- shared helpers
class _Clock:
    """Accumulates wall time per phase into a GenerationStats."""

    def __init__(self, stats: GenerationStats, device: torch.device, profile: bool):
        self.stats = stats
        self.sync = profile and device.type == "cuda"

    @contextmanager
    def phase(self, name: str):
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            attr = f"{name}_s"
            setattr(self.stats, attr, getattr(self.stats, attr) + time.perf_counter() - start)


class _RowOutput:
    """One row's output and its stop rules: EOS (kept), max_new_tokens, stop strings (the
    token completing one is kept). Tokens past a stop are dropped, never emitted."""

    def __init__(self, max_new_tokens: int, eos_token_ids: set[int], stop_strings: Sequence[str], decode):
        self.tokens: list[int] = []
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = eos_token_ids
        self.stop_strings = list(stop_strings)
        self.decode = decode
        self.tail_tokens = max((len(s) for s in self.stop_strings), default=0) + 8
        self.finish_reason: str | None = "length" if max_new_tokens <= 0 else None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, chunk: Sequence[int]) -> list[int]:
        """Append tokens until a stop rule fires; returns the tokens actually emitted."""
        emitted = []
        for token in chunk:
            if self.done:
                break
            self.tokens.append(token)
            emitted.append(token)
            if token in self.eos_token_ids:
                self.finish_reason = "eos"
            elif self.stop_strings and self._stop_string_hit():
                self.finish_reason = "stop_string"
            elif len(self.tokens) >= self.max_new_tokens:
                self.finish_reason = "length"
        return emitted

    def _stop_string_hit(self) -> bool:
        tail = self.decode(self.tokens[-self.tail_tokens:])
        return any(s in tail for s in self.stop_strings)


def _detokenizer(target, tokenizer):
    tok = tokenizer if tokenizer is not None else getattr(target, "tokenizer", None)
    if tok is None:
        return None
    if not hasattr(tok, "decode"):                       # an HF processor wraps its tokenizer
        tok = getattr(tok, "tokenizer", None)
    return (lambda ids: tok.decode(list(ids))) if tok is not None and hasattr(tok, "decode") else None


def _check_request(prompts, max_new_tokens: int, temperature: float, top_p: float) -> None:
    if not isinstance(prompts, Sequence) or len(prompts) == 0 or \
            not all(isinstance(p, VideoPrompt) for p in prompts):
        raise ValueError("prompts must be a non-empty sequence of VideoPrompt")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _capacity(target, prompts, capacity: int | None, max_new_tokens: int, tree_nodes: int,
              max_context: int) -> int:
    """The per-row KV capacity to prefill with: the caller's, else exact prompt lengths when
    the target can count them (`prompt_lengths(prompts)`), else `max_context` prompt tokens."""
    if capacity is not None:
        return int(capacity)
    count = getattr(target, "prompt_lengths", None)
    longest = max(int(n) for n in count(prompts)) if callable(count) else max_context
    return longest + max_new_tokens + tree_nodes


def _check_room(prompt_lengths: Tensor, capacity: int, max_new_tokens: int, tree_nodes: int) -> None:
    """Before any tree forward: the last verification of a row happens with at most
    prompt + max_new_tokens - 2 committed tokens and needs tree_nodes more slots."""
    if max_new_tokens < 2:
        return
    need = prompt_lengths + max_new_tokens - 2 + tree_nodes                                # [B]
    if bool((need > capacity).any()):
        b = int((need > capacity).nonzero()[0, 0])
        raise ValueError(f"capacity={capacity} is too small: row {b} needs prompt {int(prompt_lengths[b])} + "
                         f"max_new_tokens {max_new_tokens} - 2 + tree nodes {tree_nodes} = {int(need[b])} "
                         f"KV slots; pass capacity >= {int(need.max())}")


def _make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator


def _next_tokens(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> Tensor:
    """Plain decoding's choice from `[B, V]` logits: argmax, or one draw from sampling_probs."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_p)                                     # [B, V]
    uniform = torch.rand(probs.shape[0], generator=generator, device=probs.device)        # [B]
    return sample_from_probs(probs, uniform)


class _Session:
    """Per-call state shared by the speculative and the plain loop: row outputs and stats."""

    def __init__(self, target, prompts, max_new_tokens, eos_token_ids, stop_strings, tokenizer, profile):
        self.batch_size = len(prompts)
        self.decode = _detokenizer(target, tokenizer)
        stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
        if stop_strings and self.decode is None:
            raise ValueError("stop_strings need a detokenizer: pass tokenizer= (or use a target with .tokenizer)")
        if any(not s for s in stop_strings):
            raise ValueError("stop_strings must be non-empty strings")
        eos = set(int(t) for t in (target.eos_token_ids if eos_token_ids is None else eos_token_ids))
        self.rows = [_RowOutput(max_new_tokens, eos, stop_strings, self.decode) for _ in range(self.batch_size)]
        self.stats = GenerationStats(self.batch_size)
        self.clock = _Clock(self.stats, target.device, profile)

    @property
    def active(self) -> list[bool]:
        return [not row.done for row in self.rows]

    def emit(self, chunks: Sequence[Sequence[int]]) -> list[list[int]]:
        out = []
        for b, (row, chunk) in enumerate(zip(self.rows, chunks)):
            emitted = row.push(chunk) if not row.done else []
            self.stats.emitted[b] += len(emitted)
            out.append(emitted)
        return out

    def chunk(self, tokens: list[list[int]]) -> StreamChunk:
        return StreamChunk(tokens=tokens, finished=[row.done for row in self.rows], stats=self.stats)

    def result(self) -> GenerationResult:
        tokens = [row.tokens for row in self.rows]
        text = [self.decode(t) for t in tokens] if self.decode is not None else None
        return GenerationResult(tokens=tokens, text=text, finish_reasons=[row.finish_reason for row in self.rows],
                                stats=self.stats)


def _drain(chunks: Iterator[StreamChunk], session: _Session) -> GenerationResult:
    for _ in chunks:
        pass
    return session.result()


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
        session, chunks = self._start(prompts, max_new_tokens, temperature, top_p, eos_token_ids,
                                      stop_strings, seed, capacity)
        return _drain(chunks, session)

    def stream(self, prompts: Sequence[VideoPrompt], max_new_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, eos_token_ids: Sequence[int] | None = None,
               stop_strings: Sequence[str] | str | None = None, seed: int | None = None,
               capacity: int | None = None) -> Iterator[StreamChunk]:
        """As generate, but yields a StreamChunk (new tokens per row) as soon as each step's
        tokens are accepted; the first chunk holds the token chosen from the prefill."""
        _, chunks = self._start(prompts, max_new_tokens, temperature, top_p, eos_token_ids,
                                stop_strings, seed, capacity)
        return chunks

    def tree_nodes(self, sampled: bool = False) -> tuple[int, int]:
        """(nodes per verified tree, draft scratch nodes) with these settings."""
        return self.tree.size(self.target.vocab_size, sampled)

    # -- the loop -------------------------------------------------------------------------
    def _start(self, prompts, max_new_tokens, temperature, top_p, eos_token_ids, stop_strings, seed, capacity):
        _check_request(prompts, max_new_tokens, temperature, top_p)
        session = _Session(self.target, prompts, max_new_tokens, eos_token_ids, stop_strings, self.tokenizer,
                           self.profile)
        return session, self._run(session, prompts, max_new_tokens, temperature, top_p, seed, capacity)

    def _sampler(self, temperature: float, top_p: float):
        if temperature == 0 or not self.draft_sampling:
            return None
        return functools.partial(sampling_probs, temperature=temperature, top_p=top_p)

    @torch.inference_mode()
    def _run(self, session: _Session, prompts, max_new_tokens, temperature, top_p, seed, capacity):
        if max_new_tokens == 0:
            yield session.chunk([[] for _ in prompts])
            return
        target, draft, clock = self.target, self.draft, session.clock
        device, B = target.device, len(prompts)
        sampler = self._sampler(temperature, top_p)
        nodes, scratch = self.tree_nodes(sampled=sampler is not None)
        capacity = _capacity(target, prompts, capacity if capacity is not None else self.capacity,
                             max_new_tokens, nodes, self.max_context)
        generator = _make_generator(device, seed)
        runner: DraftRunner = draft_runner(draft, self.tree, sampler=sampler, generator=generator,
                                           compiled=self.fast_draft)         # chosen once per call

        with clock.phase("prefill"):
            prefill = target.prefill(prompts, self.layers, capacity)
            state = prefill.state
            _check_room(prefill.lengths, capacity, max_new_tokens, nodes)
            first = _next_tokens(prefill.logits, temperature, top_p, generator)            # [B]
        with clock.phase("bookkeeping"):
            emitted = session.emit([[t] for t in first.tolist()])
        yield session.chunk(emitted)
        if not any(session.active):
            return

        with clock.phase("prefill"):      # the draft's own prompt pass belongs to the prefill
            index, entry_tokens, valid = draft_prompt_entries(prefill, first, self.visual_kv)
            cache = draft.new_cache(B, int(valid.max()) + max_new_tokens + nodes + scratch + 1)
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
                node_index, next_tokens = open_entries(accept_index[:, :width], kept_len, tree.tokens, bonus)
                features = ops.gather_hidden([out.hidden[i] for i in self._feature_slots], node_index)
                hidden = runner.extend(cache, next_tokens, features, kept_len)             # [B, width, H]
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


# ----------------------------------------------------------------------------- the baseline
def autoregressive_generate(target: Target, prompts: Sequence[VideoPrompt], max_new_tokens: int,
                            temperature: float = 0.0, top_p: float = 1.0,
                            eos_token_ids: Sequence[int] | None = None,
                            stop_strings: Sequence[str] | str | None = None, seed: int | None = None,
                            capacity: int | None = None, tokenizer=None, profile: bool = False,
                            max_context: int = DEFAULT_MAX_CONTEXT) -> GenerationResult:
    """Plain decoding through the same target interface (prefill, then forward_tree with one
    node + commit per token), with the same stop rules, sampling and statistics fields
    (steps = decode forwards, tau = 1, draft time 0): the baseline for speedups."""
    _check_request(prompts, max_new_tokens, temperature, top_p)
    session = _Session(target, prompts, max_new_tokens, eos_token_ids, stop_strings, tokenizer, profile)
    return _drain(_autoregressive_run(target, session, prompts, max_new_tokens, temperature, top_p, seed,
                                      capacity, max_context), session)


@torch.inference_mode()
def _autoregressive_run(target, session: _Session, prompts, max_new_tokens, temperature, top_p, seed,
                        capacity, max_context) -> Iterator[StreamChunk]:
    if max_new_tokens == 0:
        yield session.chunk([[] for _ in prompts])
        return
    device, B, clock = target.device, len(prompts), session.clock
    capacity = _capacity(target, prompts, capacity, max_new_tokens, 1, max_context)
    generator = _make_generator(device, seed)
    with clock.phase("prefill"):
        prefill = target.prefill(prompts, (), capacity)
        state = prefill.state
        _check_room(prefill.lengths, capacity, max_new_tokens, 1)
        token = _next_tokens(prefill.logits, temperature, top_p, generator)                # [B]
    del prefill
    with clock.phase("bookkeeping"):
        emitted = session.emit([[t] for t in token.tolist()])
        one_node = torch.ones(B, 1, 1, dtype=torch.bool, device=device)                    # [B, 1, 1]
        root_depth = torch.zeros(B, 1, dtype=torch.int64, device=device)                   # [B, 1]
    yield session.chunk(emitted)
    while any(session.active):
        with clock.phase("verify"):
            was_active = session.active
            out = target.forward_tree(state, token[:, None], one_node, root_depth, ())
            token = _next_tokens(out.logits[:, 0], temperature, top_p, generator)         # [B]
        with clock.phase("bookkeeping"):
            session.stats.steps += 1
            for b in range(B):
                if was_active[b]:
                    session.stats.accept_lengths[b].append(1)
            emitted = session.emit([[t] if was_active[b] else [] for b, t in enumerate(token.tolist())])
            kept_len = torch.tensor(session.active, dtype=torch.int64, device=device)     # [B]
            target.commit(state, root_depth, kept_len)
        yield session.chunk(emitted)


__all__ = ["DEFAULT_MAX_CONTEXT", "GenerationResult", "GenerationStats", "SparrowGenerator", "StreamChunk",
           "autoregressive_generate", "draft_prompt_entries", "sample_from_probs", "sampling_probs"]
