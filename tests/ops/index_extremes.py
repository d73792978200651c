"""Every index argument of every op set to huge, negative and boundary int64 values, one
case at a time: a case the contract allows must give the reference's answer, any other must
raise an error naming the op, never crash or write outside a buffer. Shared by
tests/ops/test_index_extremes.py (hypothesis) and tests/ops/fuzz_ops.py (the sanitizer job's
seeded fuzz); it holds no test functions itself.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from sparrow_kernels import ops
from sparrow_kernels.ops import reference

I64_MIN, I64_MAX = -2**63, 2**63 - 1
EXTREMES = (I64_MIN, I64_MIN + 1, -2**32 - 1, -2**31 - 1, -2**31, -2, -1, 0, 1, 2, 2**31 - 1, 2**31,
            2**32 + 1, 2**32 + 3, 2**62, I64_MAX - 1, I64_MAX)

# sizes of the base inputs (small: the Triton interpreter runs them too)
B, HQ, HKV, TQ, TK, D = 2, 2, 1, 3, 8, 16   # window_attn
T, H, N_IDX = 5, 4, 3                       # gather_hidden
N, V = 4, 5                                 # tree_verify_*
L, HC, S, A = 2, 1, 8, 3                    # kv_compact


@dataclass(frozen=True)
class Case:
    """Set `arg` (a tensor element at `where`, or a scalar when where is None) to `value`."""
    op: str
    arg: str
    where: tuple | None
    value: int
    tree: bool = False   # window_attn*: with a tree mask
    more: tuple = ()     # further (arg, where, value) edits of the same op's inputs (the fuzz)

    def edits(self) -> list[tuple]:
        return [(self.arg, self.where, self.value), *self.more]

    def __str__(self) -> str:
        text = ", ".join(f"{arg}{'' if where is None else list(where)} = {value}" for arg, where, value in self.edits())
        return f"{self.op}({text}{', tree' if self.tree else ''})"


# (op, arg, shape of the tensor or None for a scalar argument)
INDEX_ARGS = [
    ("window_attn", "kv_len", (B,)), ("window_attn", "q_pos", (B, TQ)),
    ("window_attn", "window", None), ("window_attn", "n_anchor", None),
    ("window_attn_backward", "kv_len", (B,)), ("window_attn_backward", "q_pos", (B, TQ)),
    ("window_attn_backward", "window", None), ("window_attn_backward", "n_anchor", None),
    ("gather_hidden", "index", (B, N_IDX)),
    ("tree_verify_greedy", "candidates", (B, N)), ("tree_verify_greedy", "target_predict", (B, N)),
    ("tree_verify_greedy", "next_token", (B, N)), ("tree_verify_greedy", "next_sibling", (B, N)),
    ("tree_verify_sample", "candidates", (B, N)), ("tree_verify_sample", "next_token", (B, N)),
    ("tree_verify_sample", "next_sibling", (B, N)),
    ("kv_compact", "prefix_len", (B,)), ("kv_compact", "accept_index", (B, A)), ("kv_compact", "accept_len", (B,)),
]


def boundary_values(op: str, arg: str) -> tuple[int, ...]:
    """Values next to the limits of `arg` (sizes +- 1) besides the int64 extremes."""
    size = {"window_attn": TK, "window_attn_backward": TK, "gather_hidden": T, "kv_compact": S}.get(op, N)
    extra = (V - 1, V, V + 1) if arg == "candidates" else ()
    return tuple(sorted({size - 1, size, size + 1, -size, TQ - 1, TQ, *extra}))


def candidate_values(op: str, arg: str) -> tuple[int, ...]:
    return tuple(sorted(set(EXTREMES) | set(boundary_values(op, arg))))


# ----------------------------------------------------------------------------- base inputs
def base_inputs(op: str, tree: bool = False) -> dict:
    """Valid inputs of `op` on the CPU (fp32), deterministic."""
    gen = torch.Generator().manual_seed(0)
    if op in ("window_attn", "window_attn_backward"):
        x = dict(q=torch.randn(B, HQ, TQ, D, generator=gen), k=torch.randn(B, HKV, TK, D, generator=gen),
                 v=torch.randn(B, HKV, TK, D, generator=gen), kv_len=torch.tensor([TK, TK - 2]),
                 q_pos=torch.tensor([[5, 6, 7], [3, 4, 5]]), window=3, n_anchor=1,
                 tree_mask=torch.ones(TQ, TQ, dtype=torch.bool).tril().expand(B, TQ, TQ).contiguous() if tree else None,
                 scale=0.0)
        if op == "window_attn":
            return x
        out, lse = reference.window_attn(**x)
        return dict(grad_out=torch.randn(B, HQ, TQ, D, generator=gen), q=x["q"], k=x["k"], v=x["v"], out=out, lse=lse,
                    **{n: x[n] for n in ("kv_len", "q_pos", "window", "n_anchor", "tree_mask", "scale")})
    if op == "gather_hidden":
        return dict(hidden=[torch.randn(B, T, H, generator=gen) for _ in range(2)],
                    index=torch.tensor([[0, T - 1, -1], [2, 2, 1]]))
    links = dict(next_token=torch.tensor([[1, 3, -1, -1], [1, -1, -1, -1]]),
                 next_sibling=torch.tensor([[-1, 2, -1, -1], [-1, 2, 3, -1]]))
    if op == "tree_verify_greedy":
        return dict(candidates=torch.tensor([[9, 1, 2, 3], [9, 4, 4, 1]]),
                    target_predict=torch.tensor([[2, 3, 0, 1], [4, 4, 2, 3]]), **links)
    if op == "tree_verify_sample":
        probs = torch.softmax(torch.randn(B, N, V, generator=gen), -1)
        return dict(candidates=torch.tensor([[9, 1, 2, 3], [9, 4, 4, 1]]), target_probs=probs,
                    draft_probs=torch.softmax(torch.randn(B, N, V, generator=gen), -1), **links,
                    uniform_accept=torch.rand(B, N, generator=gen), uniform_final=torch.rand(B, generator=gen))
    if op == "kv_compact":
        return dict(kv=torch.randn(L, B, HC, S, 4, generator=gen), prefix_len=torch.tensor([2, 3]),
                    accept_index=torch.tensor([[0, 2, -1], [0, 1, 4]]), accept_len=torch.tensor([2, 3]))
    raise ValueError(op)


def apply_case(case: Case) -> dict:
    x = base_inputs(case.op, case.tree)
    for arg, where, value in case.edits():
        if where is None:
            x[arg] = value
        else:
            x[arg] = x[arg].clone()
            x[arg][where] = value
    return x


# ----------------------------------------------------------------------------- the contract
def allowed(case: Case, x: dict) -> bool:
    """Whether docs/ops.md allows the edited inputs (computed on Python ints: no overflow)."""
    op = case.op
    if op in ("window_attn", "window_attn_backward"):
        low = TQ if x["tree_mask"] is not None else 1
        return x["n_anchor"] >= 0 and all(low <= int(n) <= TK for n in x["kv_len"])
    if op == "gather_hidden":
        return all(-1 <= int(i) < T for i in x["index"].flatten())
    if op in ("tree_verify_greedy", "tree_verify_sample"):
        for link in (x["next_token"], x["next_sibling"]):
            for b in range(B):
                if any(not (int(v) == -1 or i < int(v) < N) for i, v in enumerate(link[b])):
                    return False
        if op == "tree_verify_sample":
            return all(0 <= int(t) < V for t in x["candidates"][:, 1:].flatten())
        return True
    if op == "kv_compact":
        for b in range(B):
            n, start = int(x["accept_len"][b]), int(x["prefix_len"][b])
            kept = [int(i) for i in x["accept_index"][b, :max(n, 0)]]
            if not 0 <= n <= A or start < 0:
                return False
            if n and (kept[0] < 0 or any(j <= i for i, j in zip(kept, kept[1:])) or start + kept[-1] >= S):
                return False
        return True
    raise ValueError(op)


def run_case(case: Case, backend: str, device: torch.device | str = "cpu") -> None:
    """Run one case on `backend`; AssertionError when it breaks the contract."""
    x = apply_case(case)
    ok = allowed(case, x)
    moved = {k: (v.to(device, copy=True) if isinstance(v, torch.Tensor) else [h.to(device) for h in v] if isinstance(v, list)
                 else v) for k, v in x.items()}
    fn = getattr(ops, case.op)
    if case.op == "kv_compact":
        kv_before = moved["kv"].clone()
    try:
        from sparrow_kernels import use_backend
        with use_backend(backend):
            result = fn(**moved)
    except (RuntimeError, ValueError) as err:
        assert not ok, f"{case} on {backend}: allowed inputs raised {type(err).__name__}: {err}"
        assert f"{case.op}:" in str(err) or f"{case.op} " in str(err), f"{case} on {backend}: error names no op: {err}"
        if case.op == "kv_compact":
            assert torch.equal(moved["kv"].cpu().nan_to_num(7.0), kv_before.cpu().nan_to_num(7.0)), \
                f"{case} on {backend}: rejected call changed kv"
        return
    assert ok, f"{case} on {backend}: inputs outside the contract were accepted"
    if case.op == "kv_compact":
        expected = x["kv"].clone()
        reference.kv_compact(expected, x["prefix_len"], x["accept_index"], x["accept_len"])
        assert torch.equal(moved["kv"].cpu(), expected), f"{case} on {backend}: kv differs from the reference"
        return
    expected = getattr(reference, case.op)(**x)
    got = result if isinstance(result, tuple) else (result,)
    want = expected if isinstance(expected, tuple) else (expected,)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=2e-5, atol=2e-5, equal_nan=True,
                                   msg=lambda m: f"{case} on {backend}: {m}")


def all_cases(tree_too: bool = True) -> list[Case]:
    """Every (op, arg, position, value) single-element case."""
    cases = []
    for op, arg, shape in INDEX_ARGS:
        positions = [None] if shape is None else [tuple(int(i) for i in idx)
                                                  for idx in torch.cartesian_prod(*[torch.arange(s) for s in shape])
                                                  .reshape(-1, len(shape))]
        for where in positions:
            for value in candidate_values(op, arg):
                cases.append(Case(op, arg, where, value))
                if tree_too and op.startswith("window_attn"):
                    cases.append(Case(op, arg, where, value, tree=True))
    return cases


def random_case(rng: random.Random, max_edits: int = 3) -> Case:
    """1..max_edits edits of one op's index arguments, values drawn from the extremes and
    boundaries, random int64 values now and then."""
    op = rng.choice(sorted({o for o, _, _ in INDEX_ARGS}))
    args = [(a, shape) for o, a, shape in INDEX_ARGS if o == op]
    edits = []
    for _ in range(rng.randint(1, max_edits)):
        arg, shape = rng.choice(args)
        where = None if shape is None else tuple(rng.randrange(s) for s in shape)
        value = rng.choice(candidate_values(op, arg)) if rng.random() < 0.8 else rng.randint(I64_MIN, I64_MAX)
        edits.append((arg, where, value))
    (arg, where, value), more = edits[0], tuple(edits[1:])
    return Case(op, arg, where, value, tree=op.startswith("window_attn") and rng.random() < 0.5, more=more)
