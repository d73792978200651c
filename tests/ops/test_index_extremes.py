"""Huge, negative and boundary values for every index argument of every op, on every
backend: allowed values give the reference's answer, others raise an error naming the op
(the cases and the contract are in tests/ops/index_extremes.py)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.ops.index_extremes import I64_MAX, INDEX_ARGS, Case, candidate_values, run_case

# Found by the fuzz of issue 17 or by reading the kernels: each broke one backend.
KNOWN = [
    Case("kv_compact", "prefix_len", (0,), I64_MAX),                 # C++: start + kept wrapped, heap write
    Case("kv_compact", "accept_index", (1, 2), I64_MAX),            # the same through the index
    Case("kv_compact", "accept_index", (0, 1), 2**63 - 3),
    Case("window_attn", "q_pos", (0, 2), 2**32 + 3),                # Triton: positions truncated to int32
    Case("window_attn", "q_pos", (1, 0), -2**32 + 3),
    Case("window_attn", "q_pos", (0, 1), I64_MAX, tree=True),
    Case("window_attn", "window", None, 2**32 + 1),
    Case("window_attn", "n_anchor", None, 2**32 + 1),
    Case("window_attn_backward", "q_pos", (0, 2), 2**32 + 3),
    Case("tree_verify_greedy", "next_token", (0, 0), 2**32 + 1),    # Triton: links truncated to int32
    Case("tree_verify_sample", "next_sibling", (1, 1), 2**32 + 2),
    Case("gather_hidden", "index", (1, 2), I64_MAX),
]


@pytest.mark.parametrize("case", KNOWN, ids=str)
def test_known_overflows(any_backend, case):
    if any_backend.device.type != "cpu":
        pytest.skip("the range checks read values on the host, for CPU tensors only")
    run_case(case, any_backend.name, any_backend.device)


@st.composite
def cases(draw):
    op, arg, shape = draw(st.sampled_from(INDEX_ARGS))
    where = None if shape is None else tuple(draw(st.integers(0, s - 1)) for s in shape)
    value = draw(st.sampled_from(candidate_values(op, arg)) | st.integers(-2**63, 2**63 - 1))
    return Case(op, arg, where, value, tree=op.startswith("window_attn") and draw(st.booleans()))


def test_every_index_argument_extremes(any_backend):
    if any_backend.device.type != "cpu":
        pytest.skip("the range checks read values on the host, for CPU tensors only")

    @settings(max_examples=any_backend.examples(300), database=None)
    @given(case=cases())
    def check(case):
        run_case(case, any_backend.name, any_backend.device)

    check()
