"""Plain (autoregressive) decoding of any Target through its own protocol (prefill, then a
one-node forward_tree and a commit per token), and what every decoder of a call shares: the
request, stop rules, sampling as HF `generate` does it, statistics, results and the KV-capacity
rule. The speculative engine (engine.py) builds on it; the targets' generate_greedy, the
benchmarks and training call it. It must not know drafts, trees or the engine.
"""
from __future__ import annotations

import inspect

import math
import numbers
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from sparrow_kernels.targets.base import Target, VideoPrompt

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
    finish_reasons: list[str]            # per row: "eos", "length" or "stop_string"
    stats: GenerationStats
    decode: Callable[[Sequence[int]], str] | None = field(default=None, repr=False)

    @property
    def text(self) -> list[str] | None:
        """The rows decoded (on first use) when a detokenizer is known, else None."""
        return [self.decode(t) for t in self.tokens] if self.decode is not None else None


@dataclass
class StreamChunk:
    tokens: list[list[int]]              # tokens accepted this step, per row (empty when none)
    finished: list[bool]                 # per row: no more tokens will come
    stats: GenerationStats               # the running statistics of this call


# ----------------------------------------------------------------------------- a call
@dataclass
class GenerationRequest:
    """What one generate/stream call asks for; validated on creation (ValueError naming the
    field). eos_token_ids None = the target's; capacity None = sized from the prompts."""

    prompts: Sequence[VideoPrompt]
    max_new_tokens: int
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    eos_token_ids: Sequence[int] | None = None
    stop_strings: Sequence[str] | str | None = None
    seed: int | None = None
    capacity: int | None = None       # KV slots per row

    def __post_init__(self) -> None:
        prompts = self.prompts
        if not isinstance(prompts, Sequence) or len(prompts) == 0 or \
                not all(isinstance(p, VideoPrompt) for p in prompts):
            raise ValueError("prompts must be a non-empty sequence of VideoPrompt")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, numbers.Integral):
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {type(self.max_new_tokens).__name__} "
                             f"{self.max_new_tokens!r}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not isinstance(self.temperature, numbers.Real) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def kv_capacity(prompt_length: int, max_new_tokens: int, tree_nodes: int = 1) -> int:
    """KV slots per row that always suffice for a call: the prompt, every generated token and
    the nodes one step writes beyond the committed ones (1 for plain decoding, the tree's
    nodes for speculation). The one capacity rule of the library and its benchmarks."""
    return int(prompt_length) + int(max_new_tokens) + int(tree_nodes)


def request_capacity(target, request: GenerationRequest, tree_nodes: int, max_context: int,
                     default: int | None = None) -> int:
    """The per-row KV capacity to prefill with: the request's (else `default`), else
    `kv_capacity` of the longest prompt when the target can count prompts
    (`prompt_lengths(prompts)`), else of `max_context` prompt tokens."""
    capacity = request.capacity if request.capacity is not None else default
    if capacity is not None:
        return int(capacity)
    count = getattr(target, "prompt_lengths", None)
    longest = max(int(n) for n in count(request.prompts)) if callable(count) else max_context
    return kv_capacity(longest, request.max_new_tokens, tree_nodes)


# ----------------------------------------------------------------------------- per-call helpers
class PhaseClock:
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


class RowOutput:
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


def detokenizer(target, tokenizer, skip_special_tokens: bool = False):
    """ids -> text through `tokenizer` (else the target's), or None when neither can decode.
    `skip_special_tokens` (for display: no <|im_end|>) applies to tokenizers whose decode takes it."""
    tok = tokenizer if tokenizer is not None else getattr(target, "tokenizer", None)
    if tok is None:
        return None
    if not hasattr(tok, "decode"):                       # an HF processor wraps its tokenizer
        tok = getattr(tok, "tokenizer", None)
    if tok is None or not hasattr(tok, "decode"):
        return None
    if skip_special_tokens and "skip_special_tokens" in inspect.signature(tok.decode).parameters:
        return lambda ids: tok.decode(list(ids), skip_special_tokens=True)
    return lambda ids: tok.decode(list(ids))


def check_room(prompt_lengths: Tensor, capacity: int, max_new_tokens: int, tree_nodes: int) -> None:
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


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator


def next_tokens(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> Tensor:
    """Plain decoding's choice from `[B, V]` logits: argmax, or one draw from sampling_probs."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_p)                                     # [B, V]
    uniform = torch.rand(probs.shape[0], generator=generator, device=probs.device)        # [B]
    return sample_from_probs(probs, uniform)


class Session:
    """Per-call state shared by the speculative and the plain loop: row outputs and stats."""

    def __init__(self, target, request: GenerationRequest, tokenizer=None, profile: bool = False):
        self.request = request
        self.batch_size = len(request.prompts)
        self.decode = detokenizer(target, tokenizer)
        stop_strings, eos_token_ids = request.stop_strings, request.eos_token_ids
        stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
        if stop_strings and self.decode is None:
            raise ValueError("stop_strings need a detokenizer: pass tokenizer= (or use a target with .tokenizer)")
        if any(not s for s in stop_strings):
            raise ValueError("stop_strings must be non-empty strings")
        eos = set(int(t) for t in (target.eos_token_ids if eos_token_ids is None else eos_token_ids))
        self.rows = [RowOutput(request.max_new_tokens, eos, stop_strings, self.decode) for _ in range(self.batch_size)]
        self.stats = GenerationStats(self.batch_size)
        self.clock = PhaseClock(self.stats, target.device, profile)

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
        return GenerationResult(tokens=tokens, finish_reasons=[row.finish_reason for row in self.rows],
                                stats=self.stats, decode=self.decode)

    def drain(self, chunks: Iterator[StreamChunk]) -> GenerationResult:
        """Run a stream of this call to its end and return the result."""
        for _ in chunks:
            pass
        return self.result()



# ----------------------------------------------------------------------------- plain decoding
def autoregressive_generate(target: Target, prompts: Sequence[VideoPrompt], max_new_tokens: int,
                            temperature: float = 0.0, top_p: float = 1.0,
                            eos_token_ids: Sequence[int] | None = None,
                            stop_strings: Sequence[str] | str | None = None, seed: int | None = None,
                            capacity: int | None = None, tokenizer=None, profile: bool = False,
                            max_context: int = DEFAULT_MAX_CONTEXT) -> GenerationResult:
    """Plain decoding through the target interface (prefill, then forward_tree with one node
    + commit per token), with the same stop rules, sampling and statistics fields as the
    speculative engine (steps = decode forwards, tau = 1, draft time 0): the baseline for
    speedups, and the one plain decoder of the library."""
    request = GenerationRequest(prompts, max_new_tokens, temperature, top_p, eos_token_ids, stop_strings, seed,
                                capacity)
    session = Session(target, request, tokenizer, profile)
    return session.drain(_autoregressive_run(target, session, max_context))


@torch.inference_mode()
def _autoregressive_run(target, session: Session, max_context: int) -> Iterator[StreamChunk]:
    request = session.request
    if request.max_new_tokens == 0:
        yield session.chunk([[] for _ in request.prompts])
        return
    device, B, clock = target.device, session.batch_size, session.clock
    capacity = request_capacity(target, request, 1, max_context)
    generator = make_generator(device, request.seed)
    with clock.phase("prefill"):
        prefill = target.prefill(request.prompts, (), capacity)
        state = prefill.state
        check_room(prefill.lengths, capacity, request.max_new_tokens, 1)
        token = next_tokens(prefill.logits, request.temperature, request.top_p, generator)  # [B]
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
            token = next_tokens(out.logits[:, 0], request.temperature, request.top_p, generator)  # [B]
        with clock.phase("bookkeeping"):
            session.stats.steps += 1
            for b in range(B):
                if was_active[b]:
                    session.stats.accept_lengths[b].append(1)
            emitted = session.emit([[t] if was_active[b] else [] for b, t in enumerate(token.tolist())])
            kept_len = torch.tensor(session.active, dtype=torch.int64, device=device)     # [B]
            target.commit(state, root_depth, kept_len)
        yield session.chunk(emitted)


__all__ = ["DEFAULT_MAX_CONTEXT", "GenerationRequest", "GenerationResult", "GenerationStats", "PhaseClock",
           "RowOutput", "Session", "StreamChunk", "autoregressive_generate", "check_room", "detokenizer",
           "kv_capacity", "make_generator", "next_tokens", "request_capacity", "sample_from_probs",
           "sampling_probs"]
