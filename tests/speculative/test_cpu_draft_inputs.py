"""The public ops sparrow_cpu::draft_tree / draft_extend (csrc/draft_cpu.cpp) called directly
with one corrupted argument at a time: each must raise a RuntimeError naming the argument
before it reads or writes anything (issue 17: lengths near INT64_MAX used to wrap the
capacity check and write outside the cache). Valid arguments come from cpu_draft.prepare on a
small random SparrowDraft; the module-level OPS is the op namespace under test."""
from __future__ import annotations

import pytest
import torch

from sparrow_kernels.speculative import cpu_draft
from sparrow_kernels.speculative.tree import TreeShape

from .test_draft import V, make_draft, rand_inputs

OPS = torch.ops.sparrow_cpu
I64_MAX, I64_MIN = 2 ** 63 - 1, -2 ** 63
B, CAPACITY, T = 2, 24, 3
SHAPE = TreeShape(10, 3, 3)            # widths [1, 3, 3, 3], counts [3, 3, 3, 3]: 9 scratch nodes


def _baseline(layers=(1, 3)):
    """(draft, fast, tree kwargs, extend kwargs): valid arguments of both ops, B rows, lengths [5, 9]."""
    draft = make_draft(window=4, n_anchor=1, layers=layers)
    cache = draft.new_cache(B, CAPACITY)
    tokens, features = rand_inputs(B, 9, draft.config.feature_size, seed=1)
    with torch.inference_mode():
        fast = cpu_draft.prepare(draft, SHAPE)
        draft.extend(cache, tokens, features, torch.tensor([5, 9]))
    assert fast is not None
    common = dict(weights=dict(fast.weights), cache_k=cache.k.clone(), cache_v=cache.v.clone(), **fast.eps,
                  **fast.layer_args)
    g = torch.Generator().manual_seed(2)
    tree = dict(common, lengths=cache.lengths.clone(), root_tokens=torch.tensor([1, 2]),
                root_hidden=torch.randn(B, draft.config.hidden_size, generator=g), widths=list(fast.widths),
                counts=list(fast.counts), n_draft=fast.n_draft)
    ext_tokens, ext_features = rand_inputs(B, T, draft.config.feature_size, seed=3)
    extend = dict(common, lengths=cache.lengths.clone(), tokens=ext_tokens, features=ext_features,
                  valid=torch.tensor([T, 2]))
    return draft, fast, tree, extend


def _call(op, kwargs):
    """The op on copies of the tensor arguments: (its result, the copies after the call)."""
    kwargs = {name: (_copy(value) if isinstance(value, torch.Tensor) else value) for name, value in kwargs.items()}
    with torch.inference_mode():
        return getattr(OPS, op)(**kwargs), kwargs


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A copy with the same strides (clone makes a strided view contiguous)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t)


def _rejects(op, kwargs, pattern):
    """The op raises a RuntimeError matching `pattern` and leaves its tensor arguments as they were."""
    tensors = {name: value for name, value in kwargs.items() if isinstance(value, torch.Tensor)}
    before = {name: value.clone() for name, value in tensors.items()}
    with torch.inference_mode(), pytest.raises(RuntimeError, match=rf"sparrow_cpu\.{op}: .*" + pattern):
        getattr(OPS, op)(**kwargs)
    for name, value in tensors.items():
        assert torch.equal(value, before[name]), f"{op} wrote to {name} before raising"


def _without(d, key):
    return {k: v for k, v in d.items() if k != key}


def _weight(name, make):
    """An edit replacing weights[name] by make(weights[name])."""
    return lambda a: {**a, "weights": {**a["weights"], name: make(a["weights"][name])}}


# (id, edit of the kwargs dict, pattern the error must match); the edits shared by both ops
COMMON_CASES = [
    ("lengths_int64_max", lambda a: {**a, "lengths": torch.tensor([5, I64_MAX])}, r"lengths\[1\] must be in \[0, "),
    ("lengths_int64_max_minus_1", lambda a: {**a, "lengths": torch.tensor([I64_MAX - 1, 9])}, r"lengths\[0\]"),
    ("lengths_int64_min", lambda a: {**a, "lengths": torch.tensor([I64_MIN, 9])}, r"lengths\[0\] must be in"),
    ("lengths_negative", lambda a: {**a, "lengths": torch.tensor([-1, 9])}, r"lengths\[0\] must be in"),
    ("lengths_too_short", lambda a: {**a, "lengths": torch.tensor([5])}, r"lengths must have shape \[B\] = \[2\]"),
    ("lengths_int32", lambda a: {**a, "lengths": a["lengths"].int()}, r"lengths must have dtype int64"),
    ("lengths_2d", lambda a: {**a, "lengths": a["lengths"][:, None]}, r"lengths must have shape"),
    ("cache_k_batch", lambda a: {**a, "cache_k": a["cache_k"][:1].clone()}, r"cache_k must have shape"),
    ("cache_k_3d", lambda a: {**a, "cache_k": a["cache_k"][:, 0].clone()}, r"cache_k must have shape"),
    ("cache_k_kv_heads", lambda a: {**a, "cache_k": a["cache_k"][:, :1].clone()}, r"cache_k must have shape"),
    ("cache_v_capacity", lambda a: {**a, "cache_v": a["cache_v"][:, :, :5].clone()}, r"cache_v must have shape"),
    ("cache_v_head_dim", lambda a: {**a, "cache_v": a["cache_v"][..., :4].clone()}, r"cache_v must have shape"),
    ("cache_k_float64", lambda a: {**a, "cache_k": a["cache_k"].double()}, r"cache_k must have dtype float32"),
    ("cache_v_strided", lambda a: {**a, "cache_v": a["cache_v"].transpose(2, 3).contiguous().transpose(2, 3)},
     r"cache_k and cache_v must be contiguous"),
    ("cache_head_dim_odd", lambda a: {**a, "cache_k": a["cache_k"][..., :7].clone(),
                                      "cache_v": a["cache_v"][..., :7].clone()}, r"head dim.*even"),
    ("cache_head_dim_vs_qkv", lambda a: {**a, "cache_k": a["cache_k"][..., :4].clone(),
                                         "cache_v": a["cache_v"][..., :4].clone()},
     r"weights\['qkv'\] must have shape"),
    ("weights_missing", lambda a: {**a, "weights": _without(a["weights"], "down")}, r"weights must hold exactly"),
    ("weights_renamed", lambda a: {**a, "weights": {**_without(a["weights"], "down"), "downs": a["weights"]["down"]}},
     r"weights has no entry 'down'"),
    ("table_2h", _weight("table", lambda w: torch.cat([w, w], 1)),
     r"weights\['gate_up'\] must have shape \[H, 2I\] = \[64"),
    ("table_1d", _weight("table", lambda w: w[0].clone()), r"weights\['table'\] must have shape"),
    ("lm_head_vocab", _weight("lm_head", lambda w: w[:-1].clone()), r"weights\['lm_head'\] must have shape"),
    ("lm_head_hidden", _weight("lm_head", lambda w: w[:, :-1].clone()), r"weights\['lm_head'\] must have shape"),
    ("feature_fc", _weight("feature_fc", lambda w: w[:-1].clone()), r"weights\['feature_fc'\] must have shape"),
    ("input_norm", _weight("input_norm", lambda w: w[:-1].clone()), r"weights\['input_norm'\] must have shape"),
    ("qkv", _weight("qkv", lambda w: w[:, :-8].clone()), r"weights\['qkv'\] must have shape"),
    ("o", _weight("o", lambda w: w[:-8].clone()), r"weights\['o'\] must have shape"),
    ("post_norm", _weight("post_norm", lambda w: w[:-1].clone()), r"weights\['post_norm'\] must have shape"),
    ("gate_up_odd", _weight("gate_up", lambda w: w[:, :-1].clone()), r"weights\['gate_up'\] must be \[H, 2 I\]"),
    ("gate_up_rows", _weight("gate_up", lambda w: w[:-1].clone()), r"weights\['gate_up'\] must have shape"),
    ("down", _weight("down", lambda w: w[:-2].clone()), r"weights\['down'\] must have shape"),
    ("final_norm", _weight("final_norm", lambda w: w[:-1].clone()), r"weights\['final_norm'\] must have shape"),
    ("fuse_hidden", _weight("fuse", lambda w: w[:, :-1].clone()), r"weights\['fuse'\] must have shape"),
    ("o_float64", _weight("o", lambda w: w.double()), r"weights\['o'\] must have dtype float32"),
    ("qkv_strided", _weight("qkv", lambda w: w.t().contiguous().t()), r"weights\['qkv'\] must be contiguous"),
    ("num_heads_0", lambda a: {**a, "num_heads": 0}, r"num_heads must be"),
    ("num_kv_heads_0", lambda a: {**a, "num_kv_heads": 0}, r"num_heads must be|cache_k must have shape"),
    ("num_heads_not_multiple", lambda a: {**a, "num_heads": 3}, r"num_heads must be a positive multiple"),
    ("num_heads_overflow", lambda a: {**a, "num_heads": 2 ** 62}, r"overflows int64"),
    ("num_heads_wrong", lambda a: {**a, "num_heads": 2}, r"weights\['qkv'\] must have shape"),
    ("eps_input_nan", lambda a: {**a, "eps_input": float("nan")}, r"eps_input must be finite and >= 0"),
    ("eps_final_negative", lambda a: {**a, "eps_final": -1.0}, r"eps_final must be finite and >= 0"),
    ("rope_theta_0", lambda a: {**a, "rope_theta": 0.0}, r"rope_theta must be finite and > 0"),
    ("n_anchor_negative", lambda a: {**a, "n_anchor": -1}, r"n_anchor must be >= 0"),
]

TREE_CASES = [
    # the scratch nodes after the committed slots: lengths[1] = 9 + 9 scratch <= 24, 16 + 9 > 24
    ("lengths_past_scratch_room", lambda a: {**a, "lengths": torch.tensor([5, 16])},
     r"row 1 has lengths\[1\]=16 committed slots and needs 9 more scratch slots, but the draft cache capacity is 24"),
    ("lengths_at_capacity", lambda a: {**a, "lengths": torch.tensor([5, CAPACITY])}, r"row 1 .* needs 9 more"),
    ("root_tokens_2d", lambda a: {**a, "root_tokens": a["root_tokens"][:, None]}, r"root_tokens must have shape"),
    ("root_tokens_int32", lambda a: {**a, "root_tokens": a["root_tokens"].int()}, r"root_tokens must have dtype"),
    # B is root_tokens' length: every other argument is checked against it (no read past their end)
    ("root_tokens_longer", lambda a: {**a, "root_tokens": torch.tensor([1, 2, 3])}, r"cache_k must have shape"),
    ("root_hidden_short", lambda a: {**a, "root_hidden": a["root_hidden"][:1]}, r"root_hidden must have shape"),
    ("root_hidden_width", lambda a: {**a, "root_hidden": a["root_hidden"][:, :-1]}, r"root_hidden must have shape"),
    ("root_hidden_float64", lambda a: {**a, "root_hidden": a["root_hidden"].double()}, r"root_hidden must have dtype"),
    ("counts_negative", lambda a: {**a, "counts": [-3] + a["counts"][1:]}, r"counts\[0\] must be in \[1, "),
    ("counts_zero", lambda a: {**a, "counts": a["counts"][:2] + [0] + a["counts"][3:]}, r"counts\[2\] must be in"),
    ("counts_over_vocab", lambda a: {**a, "counts": [V + 1] + a["counts"][1:]},
     rf"counts\[0\] must be in \[1, {V}\] \(the draft's vocabulary size\)"),
    ("counts_int64_max", lambda a: {**a, "counts": [I64_MAX] * len(a["counts"])}, r"counts\[0\] must be in"),
    ("widths_negative", lambda a: {**a, "widths": [1, -3] + a["widths"][2:]}, r"widths\[1\] must be >= 1"),
    ("widths_over_candidates", lambda a: {**a, "widths": [1, 4] + a["widths"][2:]},
     r"widths\[1\] must be <= widths\[0\] \* counts\[0\] = 3"),
    ("widths_first_not_1", lambda a: {**a, "widths": [2] + a["widths"][1:]}, r"widths\[0\] == 1"),
    ("widths_counts_lengths", lambda a: {**a, "widths": a["widths"][:-1]}, r"widths and counts must have the same"),
    ("widths_empty", lambda a: {**a, "widths": [], "counts": []}, r"widths and counts must have the same length"),
    ("widths_int64_max", lambda a: {**a, "widths": [1, 3, 9, I64_MAX]}, r"widths\[3\] must be <="),
    ("scratch_over_capacity", lambda a: {**a, "widths": [1, 3, 9, 9, 9], "counts": [3] * 5, "n_draft": 5},
     r"scratch nodes .* exceed the draft cache capacity 24"),
    ("n_draft_0", lambda a: {**a, "n_draft": 0}, r"n_draft must be in \[1, "),
    ("n_draft_over_pool", lambda a: {**a, "n_draft": 1 + sum(w * c for w, c in zip(a["widths"], a["counts"]))},
     r"n_draft must be in \[1, 30\]"),
    ("n_draft_int64_max", lambda a: {**a, "n_draft": I64_MAX}, r"n_draft must be in"),
]

# With a draft vocabulary (weights['vocab'], K sorted target ids; lm_head holds their K rows).
VOCAB = torch.arange(1, V, 2)                       # 18 ids


def with_vocab(a, vocab=VOCAB, rows=None):
    """The kwargs with a draft vocabulary: weights['vocab'] = vocab, lm_head = `rows` (default:
    the rows of VOCAB)."""
    lm = a["weights"]["lm_head"]
    return {**a, "weights": {**a["weights"], "vocab": vocab, "lm_head": lm[VOCAB].contiguous() if rows is None else rows}}


VOCAB_CASES = [
    ("vocab_unsorted", lambda a: with_vocab(a, VOCAB.flip(0).contiguous()), r"weights\['vocab'\] must be strictly increasing"),
    ("vocab_repeat", lambda a: with_vocab(a, torch.cat([VOCAB[:1], VOCAB[:-1]])), r"strictly increasing, but entry 1"),
    ("vocab_past_end", lambda a: with_vocab(a, torch.cat([VOCAB[:-1], torch.tensor([V])])),
     rf"weights\['vocab'\]\[17\]={V} is outside \[0, V={V}\)"),
    ("vocab_negative", lambda a: with_vocab(a, torch.cat([torch.tensor([-1]), VOCAB[1:]])), r"vocab'\]\[0\]=-1 is outside"),
    ("vocab_int64_max", lambda a: with_vocab(a, torch.cat([VOCAB[:-1], torch.tensor([I64_MAX])])), r"is outside"),
    ("vocab_int32", lambda a: with_vocab(a, VOCAB.int()), r"weights\['vocab'\] must have dtype int64"),
    ("vocab_2d", lambda a: with_vocab(a, VOCAB[None]), r"weights\['vocab'\] must have shape \[K\]"),
    ("vocab_strided", lambda a: with_vocab(a, torch.arange(0, 2 * V, 2)[::2][:18]), r"vocab'\] must be contiguous"),
    ("vocab_empty", lambda a: with_vocab(a, VOCAB[:0], a["weights"]["lm_head"][:0]), r"must hold 1 to V=37 ids, got 0"),
    ("vocab_longer_than_v", lambda a: with_vocab(a, torch.arange(V + 1), torch.zeros(V + 1, 32)),
     r"must hold 1 to V=37 ids, got 38"),
    ("vocab_full_head", lambda a: with_vocab(a, rows=a["weights"]["lm_head"]),
     r"weights\['lm_head'\] must have shape \[K \(the vocab's size\), H\] = \[18, 32\]"),
    ("vocab_extra_entry", lambda a: {**with_vocab(a), "weights": {**with_vocab(a)["weights"], "bias": VOCAB.float()}},
     r"weights must hold exactly"),
]

TREE_VOCAB_CASES = [
    ("vocab_counts_over_k", lambda a: {**with_vocab(a), "counts": [19] + a["counts"][1:]},
     r"counts\[0\] must be in \[1, 18\] \(the draft's vocabulary size\)"),
]

EXTEND_CASES = [
    ("lengths_past_room", lambda a: {**a, "lengths": torch.tensor([CAPACITY - 2, 9])},
     r"row 0 has lengths\[0\]=22 committed slots and needs 3 more entries"),
    ("tokens_1d", lambda a: {**a, "tokens": a["tokens"][0]}, r"tokens must have shape \[B, T\]"),
    ("tokens_int32", lambda a: {**a, "tokens": a["tokens"].int()}, r"tokens must have dtype int64"),
    ("tokens_longer_batch", lambda a: {**a, "tokens": torch.cat([a["tokens"], a["tokens"]])}, r"cache_k must have"),
    ("features_short_T", lambda a: {**a, "features": a["features"][:, :1]}, r"features must have shape"),
    ("features_short_B", lambda a: {**a, "features": a["features"][:1]}, r"features must have shape"),
    ("features_width", lambda a: {**a, "features": a["features"][..., :-1]}, r"features must have shape"),
    ("features_float64", lambda a: {**a, "features": a["features"].double()}, r"features must have dtype float32"),
    ("valid_short", lambda a: {**a, "valid": a["valid"][:1]}, r"valid must have shape \[B\] = \[2\]"),
    ("valid_int32", lambda a: {**a, "valid": a["valid"].int()}, r"valid must have dtype int64"),
    ("lengths_strided", lambda a: {**a, "lengths": torch.tensor([5, 0, 9, 0])[::2]}, r"lengths must be contiguous"),
]


@pytest.fixture(scope="module")
def baseline():
    return _baseline()


def test_baseline_arguments_are_valid(baseline):
    """The uncorrupted arguments run and agree with cpu_draft (so every case below corrupts a
    valid call, and its error comes from the corruption)."""
    draft, fast, tree, extend = baseline
    (tokens, parents, *_), _ = _call("draft_tree", tree)
    assert tokens.shape == parents.shape == (B, fast.n_draft + 1)
    hidden, after = _call("draft_extend", extend)
    assert after["lengths"].tolist() == [5 + T, 9 + 2]
    assert hidden.shape == (B, T, draft.config.hidden_size) and bool(hidden[0].abs().sum() > 0)
    assert bool((hidden[1, 2:] == 0).all())


TREE_ALL = COMMON_CASES + TREE_CASES + VOCAB_CASES + TREE_VOCAB_CASES
EXTEND_ALL = COMMON_CASES + EXTEND_CASES + VOCAB_CASES


@pytest.mark.parametrize("edit,pattern", [c[1:] for c in TREE_ALL], ids=[c[0] for c in TREE_ALL])
def test_draft_tree_rejects(baseline, edit, pattern):
    _rejects("draft_tree", edit(baseline[2]), pattern)


@pytest.mark.parametrize("edit,pattern", [c[1:] for c in EXTEND_ALL], ids=[c[0] for c in EXTEND_ALL])
def test_draft_extend_rejects(baseline, edit, pattern):
    _rejects("draft_extend", edit(baseline[3]), pattern)


def test_valid_vocab_drafts_only_its_ids(baseline):
    """A valid draft vocabulary: every drafted token is one of its ids (the root is the caller's)."""
    (tokens, *_), _ = _call("draft_tree", with_vocab(baseline[2]))
    assert bool(torch.isin(tokens[:, 1:], VOCAB).all())
    _call("draft_extend", with_vocab(baseline[3]))


def test_rejected_calls_write_nothing(baseline):
    """Row 1 does not fit: row 0 (which does) must not be written either, nor lengths updated."""
    _rejects("draft_extend", dict(baseline[3], lengths=torch.tensor([5, CAPACITY - 1])), r"row 1 has lengths\[1\]=23")
    _rejects("draft_tree", dict(baseline[2], lengths=torch.tensor([5, CAPACITY - 1])), r"row 1 has lengths\[1\]=23")


def test_one_feature_layer_checks_features_against_hidden():
    """Without feature fusion (`fuse` empty) features are [B, T, H]; a non-empty fuse of another
    shape, or an empty one with 2 dims, is rejected by name."""
    _, _, tree, extend = _baseline(layers=(4,))
    assert extend["weights"]["fuse"].numel() == 0
    _call("draft_extend", extend)
    with pytest.raises(RuntimeError, match=r"features must have shape \[B, T, H\] = \[2, 3, 32\]"):
        _call("draft_extend", dict(extend, features=torch.zeros(B, T, 64)))
    bad_fuse = dict(tree["weights"], fuse=torch.zeros(0, 32))
    with pytest.raises(RuntimeError, match=r"weights\['fuse'\] must have shape \[empty\] = \[0\]"):
        _call("draft_tree", dict(tree, weights=bad_fuse))


def test_python_front_rejects_wrapping_lengths():
    """cpu_draft's own capacity checks compare without adding too (a wrapped sum passed before)."""
    draft = make_draft()
    with torch.inference_mode():
        fast = cpu_draft.prepare(draft, SHAPE)
    cache = draft.new_cache(1, CAPACITY)
    root_hidden = torch.zeros(1, draft.config.hidden_size)
    tokens, features = rand_inputs(1, 2, draft.config.feature_size)
    for bad in (I64_MAX, I64_MAX - 3, -1):
        cache.lengths = torch.tensor([bad])
        with torch.inference_mode():
            with pytest.raises(ValueError, match=r"cache.lengths\[0\] must be in \[0, 24\]"):
                fast.build_tree(cache, torch.tensor([1]), root_hidden)
            with pytest.raises(ValueError, match=r"cache.lengths\[0\] must be in \[0, 24\]"):
                fast.extend(cache, tokens, features, torch.tensor([2]))


# ----------------------------------------------------------------------- random extremes (fuzz)
EXTREMES = (I64_MIN, I64_MIN + 1, -2, -1, 0, 1, 2, 3, 9, CAPACITY - 9, CAPACITY - 3, CAPACITY - 1, CAPACITY,
            CAPACITY + 1, 2 ** 31, 2 ** 32 + 1, 2 ** 62, I64_MAX - 9, I64_MAX - 1, I64_MAX)


def random_call(rng, baseline) -> tuple[str, dict]:
    """(op, kwargs): a valid call of either op with 1-3 of its index arguments (lengths, valid,
    widths, counts, n_draft, window, n_anchor) set to extreme values drawn by `rng` (random.Random)."""
    op = rng.choice(("draft_tree", "draft_extend"))
    kwargs = dict(baseline[2] if op == "draft_tree" else baseline[3])
    names = ["lengths", "window", "n_anchor"] + (["widths", "counts", "n_draft"] if op == "draft_tree" else ["valid"])
    for name in rng.sample(names, rng.randint(1, 3)):
        value = kwargs[name]
        if isinstance(value, torch.Tensor):
            kwargs[name] = torch.tensor([rng.choice(EXTREMES) if rng.random() < 0.7 else int(v) for v in value])
        elif isinstance(value, list):
            kwargs[name] = [rng.choice(EXTREMES) if rng.random() < 0.5 else v for v in value]
        else:
            kwargs[name] = rng.choice(EXTREMES)
    return op, kwargs


def check_random_call(op: str, kwargs: dict, must_reject: bool = False) -> str | None:
    """Runs one random_call on copies; None when it returned (unless must_reject) or raised this
    op's RuntimeError, else what went wrong. (A heap write or a read past a buffer crashes the process instead;
    the sanitizer job, tests/ops/fuzz_ops.py, runs these under ASan.)"""
    try:
        result, after = _call(op, kwargs)
    except RuntimeError as err:
        return None if f"sparrow_cpu.{op}: " in str(err) else f"{op}: unexpected error {err!s:.200}"
    except Exception as err:  # noqa: BLE001 - any other exception type is a broken contract
        return f"{op}: {type(err).__name__} instead of RuntimeError: {err!s:.200}"
    if must_reject:
        return f"{op} accepted a corrupted argument"
    lengths = after["lengths"].tolist()
    if not all(0 <= n <= CAPACITY for n in lengths):
        return f"{op} accepted / produced lengths {lengths} outside [0, {CAPACITY}]"
    return None


def test_random_extremes_are_answered_or_rejected(baseline):
    import random
    rng = random.Random(17)
    failures = [msg for msg in (check_random_call(*random_call(rng, baseline)) for _ in range(150)) if msg]
    assert not failures, failures[:5]


def fuzz(seed: int, n_random: int) -> tuple[int, list[str]]:
    """For tests/ops/fuzz_ops.py (the sanitizer job): every single-argument corruption above on
    both ops, then `n_random` random_call cases; (cases run, what went wrong)."""
    import random
    base = _baseline()
    calls = [("draft_tree", edit(base[2])) for _, edit, _ in TREE_ALL]
    calls += [("draft_extend", edit(base[3])) for _, edit, _ in EXTEND_ALL]
    rng = random.Random(seed)
    n_corrupted = len(calls)
    calls += [random_call(rng, base) for _ in range(n_random)]
    failures = []
    for i, (op, kwargs) in enumerate(calls):
        msg = check_random_call(op, kwargs, must_reject=i < n_corrupted)
        if msg:
            failures.append(msg)
    return len(calls), failures
