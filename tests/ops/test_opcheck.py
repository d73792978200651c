"""torch.library.opcheck on every torch.ops.sparrow.* op (schema, fake impl against the
kernel, autograd registration, AOT dispatch) and a fullgraph torch.compile trace."""
from __future__ import annotations

import torch

from sparrow_kernels import ops
from tests.ops.helpers import WindowCase, make_window_inputs


def window_samples(dev):
    """(args, kwargs-free) samples: plain decode, windowed prefill with anchors, a tree; GQA 3."""
    samples = []
    for case in (WindowCase(1, 1, 3, 16, 1, 9, (7,), 4, 1, False, False, False, 0.0, 0),
                 WindowCase(2, 2, 1, 24, 4, 10, (10, 6), 3, 2, False, False, True, 0.2, 1),
                 WindowCase(2, 1, 2, 16, 5, 9, (9, 7), 0, 0, True, False, False, 0.0, 2)):
        x = make_window_inputs(case, torch.float32, dev)
        x.k, x.v = torch.nan_to_num(x.k), torch.nan_to_num(x.v)   # opcheck compares runs: keep values finite
        samples.append(x)
    return samples


def test_opcheck_window_attn(compiled_backend):
    for x in window_samples(compiled_backend.device):
        args = list(x.args())
        for i in range(3):  # q, k, v require grad: also exercises the autograd registration
            args[i] = args[i].detach().requires_grad_()
        torch.library.opcheck(torch.ops.sparrow.window_attn.default, tuple(args))


def test_opcheck_window_attn_backward(compiled_backend):
    for x in window_samples(compiled_backend.device):
        out, lse = torch.ops.sparrow.window_attn(*x.args())
        grad_out = torch.randn_like(out)
        torch.library.opcheck(torch.ops.sparrow.window_attn_backward.default,
                              (grad_out, x.q, x.k, x.v, out, lse) + tuple(x.args()[3:]))


def test_opcheck_gather_hidden(compiled_backend):
    dev = compiled_backend.device
    hidden = [torch.randn(2, 7, 12, device=dev) for _ in range(3)]
    index = torch.tensor([[0, 6, -1, 3], [-1, -1, 2, 2]], device=dev)
    torch.library.opcheck(torch.ops.sparrow.gather_hidden.default, (hidden, index))


def test_opcheck_tree_verify(compiled_backend):
    dev = compiled_backend.device
    gen = torch.Generator().manual_seed(0)
    candidates = torch.tensor([[0, 1, 2, 1, 0], [3, 2, 2, 0, 1]], device=dev)
    next_token = torch.tensor([[1, 3, -1, -1, -1], [1, -1, 3, -1, -1]], device=dev)
    next_sibling = torch.tensor([[-1, 2, 4, -1, -1], [-1, 2, -1, 4, -1]], device=dev)
    target_predict = torch.tensor([[1, 1, 0, 2, 0], [2, 0, 0, 1, 0]], device=dev)
    torch.library.opcheck(torch.ops.sparrow.tree_verify_greedy.default,
                          (candidates, target_predict, next_token, next_sibling))
    target = torch.softmax(torch.randn(2, 5, 4, generator=gen), -1).to(dev)
    for draft in (torch.softmax(torch.randn(2, 5, 4, generator=gen), -1).to(dev), torch.zeros(2, 5, 4, device=dev)):
        torch.library.opcheck(torch.ops.sparrow.tree_verify_sample.default,
                              (candidates, target, draft, next_token, next_sibling,
                               torch.rand(2, 5, generator=gen).to(dev), torch.rand(2, generator=gen).to(dev)))


def test_opcheck_kv_compact(compiled_backend):
    dev = compiled_backend.device
    kv = torch.randn(4, 2, 2, 10, 8, device=dev)
    args = (kv, torch.tensor([3, 0], device=dev), torch.tensor([[0, 2, 3], [1, 4, -1]], device=dev),
            torch.tensor([3, 2], device=dev))
    torch.library.opcheck(torch.ops.sparrow.kv_compact.default, args)


def test_fullgraph_compile_traces_every_op(compiled_backend):
    """The fake impls let torch.compile capture all ops in one graph (aot_eager: no codegen)."""
    dev = compiled_backend.device
    x = window_samples(dev)[2]

    def step(q, k, v, hidden, index, kv, cand, predict, next_token, next_sibling):
        out, lse = torch.ops.sparrow.window_attn(q, k, v, x.kv_len, x.q_pos, 0, 0, x.tree_mask, 0.0)
        features = torch.ops.sparrow.gather_hidden([hidden, hidden * 2], index)
        accept_index, accept_len, bonus = torch.ops.sparrow.tree_verify_greedy(cand, predict, next_token, next_sibling)
        torch.ops.sparrow.kv_compact(kv, torch.zeros_like(accept_len), accept_index, accept_len)
        return out.sum() + lse.sum() + features.sum(), bonus

    hidden = torch.randn(2, 6, 8, device=dev)
    index = torch.tensor([[0, 5, -1], [1, 1, 2]], device=dev)
    cand = torch.tensor([[0, 1, 2], [0, 2, 1]], device=dev)
    predict = torch.tensor([[1, 5, 5], [1, 5, 5]], device=dev)
    next_token = torch.tensor([[1, -1, -1]] * 2, device=dev)
    next_sibling = torch.tensor([[-1, 2, -1]] * 2, device=dev)
    kv_eager = torch.randn(2, 2, 1, 4, 3, device=dev)
    kv_compiled = kv_eager.clone()
    eager = step(x.q, x.k, x.v, hidden, index, kv_eager, cand, predict, next_token, next_sibling)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(
        x.q, x.k, x.v, hidden, index, kv_compiled, cand, predict, next_token, next_sibling)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(kv_compiled, kv_eager)


def test_fullgraph_compile_through_the_python_front(compiled_backend):
    """sparrow_kernels.ops.* (backend choice + checks) traces in one graph as well."""
    x = window_samples(compiled_backend.device)[1]

    def attend(q, k, v):
        return ops.window_attn(q, k, v, x.kv_len, x.q_pos, x.window, x.n_anchor, None, x.scale)

    with compiled_backend.use():
        eager = attend(x.q, x.k, x.v)
        compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")(x.q, x.k, x.v)
    torch.testing.assert_close(compiled, eager)
