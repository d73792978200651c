"""Bad inputs raise a RuntimeError/ValueError naming the argument, on every backend and
the reference path, never a crash or a silent result; plus the import-time errors."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import sparrow_kernels
from sparrow_kernels import ops


# ----------------------------------------------------------------------------- valid inputs per op
def window_inputs(dev, B=2, Hq=4, Hkv=2, Tq=3, Tk=8, D=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, Tq, D, generator=gen).to(dev, dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=gen).to(dev, dtype)
    v = torch.randn(B, Hkv, Tk, D, generator=gen).to(dev, dtype)
    kv_len = torch.full((B,), Tk, dtype=torch.int64, device=dev)
    q_pos = (Tk - Tq + torch.arange(Tq, device=dev)).expand(B, Tq).contiguous()
    tree_mask = torch.ones(Tq, Tq, dtype=torch.bool, device=dev).tril().expand(B, Tq, Tq).contiguous()
    return dict(q=q, k=k, v=v, kv_len=kv_len, q_pos=q_pos, window=4, n_anchor=1, tree_mask=tree_mask, scale=0.0)


def backward_inputs(dev):
    x = window_inputs(dev)
    out = torch.randn_like(x["q"])
    lse = torch.randn(x["q"].shape[:3], device=dev)
    return dict(grad_out=torch.randn_like(out), q=x["q"], k=x["k"], v=x["v"], out=out, lse=lse,
                **{n: x[n] for n in ("kv_len", "q_pos", "window", "n_anchor", "tree_mask", "scale")})


def gather_inputs(dev, B=2, T=5, H=8):
    hidden = [torch.randn(B, T, H, device=dev) for _ in range(3)]
    return dict(hidden=hidden, index=torch.tensor([[0, 4, -1], [2, 2, 1]], device=dev))


def greedy_inputs(dev):
    return dict(candidates=torch.tensor([[5, 1, 2]], device=dev), target_predict=torch.tensor([[1, 2, 3]], device=dev),
                next_token=torch.tensor([[1, -1, -1]], device=dev), next_sibling=torch.tensor([[-1, 2, -1]], device=dev))


def sample_inputs(dev, V=4):
    g = greedy_inputs(dev)
    probs = torch.full((1, 3, V), 1.0 / V, device=dev)
    return dict(candidates=g["candidates"].clamp(max=V - 1), target_probs=probs, draft_probs=probs.clone(),
                next_token=g["next_token"], next_sibling=g["next_sibling"],
                uniform_accept=torch.full((1, 3), 0.5, device=dev), uniform_final=torch.full((1,), 0.5, device=dev))


def compact_inputs(dev):
    return dict(kv=torch.randn(2, 2, 1, 8, 4, device=dev), prefix_len=torch.tensor([2, 3], device=dev),
                accept_index=torch.tensor([[0, 2, -1], [0, 1, 4]], device=dev), accept_len=torch.tensor([2, 3], device=dev))


OPS = {"window_attn": (ops.window_attn, window_inputs), "window_attn_backward": (ops.window_attn_backward, backward_inputs),
       "gather_hidden": (ops.gather_hidden, gather_inputs), "tree_verify_greedy": (ops.tree_verify_greedy, greedy_inputs),
       "tree_verify_sample": (ops.tree_verify_sample, sample_inputs), "kv_compact": (ops.kv_compact, compact_inputs)}


def _set(name, value):
    return lambda x: {**x, name: value(x) if callable(value) else value}


def _f(**kw):
    return lambda x: {**x, **{k: v(x) for k, v in kw.items()}}


# (op, case id, edit of the valid inputs, regex the message must match, reads values: CPU-only check)
BAD = [
    ("window_attn", "q rank 3", _f(q=lambda x: x["q"][:, :, 0]), r"window_attn: q must have shape \[B, Hq, Tq, D\]", False),
    ("window_attn", "k batch", _f(k=lambda x: x["k"][:1], v=lambda x: x["v"][:1]), r"k must have shape \[B, Hkv, Tk, D\] = \[2, \?, \?, 16\]", False),
    ("window_attn", "v heads", _f(v=lambda x: x["v"][:, :1]), r"v must have shape \[B, Hkv, Tk, D\] = \[2, 2, 8, 16\], got \[2, 1, 8, 16\]", False),
    ("window_attn", "k head dim", _f(k=lambda x: x["k"][..., :8]), r"k must have shape", False),
    ("window_attn", "Hq % Hkv", _f(k=lambda x: x["k"].repeat(1, 3, 1, 1)[:, :3], v=lambda x: x["v"].repeat(1, 3, 1, 1)[:, :3]),
     r"Hq=4 must be a multiple of the kv heads Hkv=3", False),
    ("window_attn", "dtype mix", _f(k=lambda x: x["k"].half()), r"q, k, v must have the same dtype", False),
    ("window_attn", "int q", _f(q=lambda x: x["q"].long(), k=lambda x: x["k"].long(), v=lambda x: x["v"].long()), r"q must have dtype", False),
    ("window_attn", "kv_len int32", _f(kv_len=lambda x: x["kv_len"].int()), r"kv_len must have dtype int64, got int32", False),
    ("window_attn", "kv_len shape", _f(kv_len=lambda x: x["kv_len"][:1]), r"kv_len must have shape \[B\] = \[2\]", False),
    ("window_attn", "q_pos rank", _f(q_pos=lambda x: x["q_pos"][:, 0]), r"q_pos must have shape \[B, Tq\]", False),
    ("window_attn", "tree_mask dtype", _f(tree_mask=lambda x: x["tree_mask"].float()), r"tree_mask must have dtype bool", False),
    ("window_attn", "tree_mask shape", _f(tree_mask=lambda x: x["tree_mask"][:, :2]), r"tree_mask must have shape \[B, Tq, Tq\]", False),
    ("window_attn", "n_anchor < 0", _set("n_anchor", -1), r"n_anchor must be >= 0, got -1", False),
    ("window_attn", "head dim > 256", _f(q=lambda x: x["q"].repeat(1, 1, 1, 17), k=lambda x: x["k"].repeat(1, 1, 1, 17),
                                         v=lambda x: x["v"].repeat(1, 1, 1, 17)), r"head dim D must be in \[1, 256\], got 272", False),
    ("window_attn", "q last dim strided", _f(q=lambda x: x["q"].repeat_interleave(2, -1)[..., ::2]),
     r"q must be contiguous in its last dimension", False),
    ("window_attn", "k last dim strided", _f(k=lambda x: x["k"].repeat_interleave(2, -1)[..., ::2]),
     r"k must be contiguous in its last dimension", False),
    ("window_attn", "kv_len 0", _f(tree_mask=lambda x: None, kv_len=lambda x: torch.zeros_like(x["kv_len"])),
     r"kv_len must be in \[1, Tk\] = \[1, 8\], got kv_len\[0\] = 0", True),
    ("window_attn", "kv_len > Tk", _f(kv_len=lambda x: x["kv_len"] + torch.tensor([0, 1], device=x["kv_len"].device)),
     r"kv_len must be in .* got kv_len\[1\] = 9", True),
    ("window_attn", "kv_len < Tq with tree", _f(kv_len=lambda x: torch.full_like(x["kv_len"], 2)),
     r"kv_len must be in \[Tq \(tree_mask given\), Tk\] = \[3, 8\]", True),
    ("window_attn_backward", "grad_out shape", _f(grad_out=lambda x: x["grad_out"][:, :2]), r"window_attn_backward: grad_out must have shape", False),
    ("window_attn_backward", "lse dtype", _f(lse=lambda x: x["lse"].half()), r"lse must have dtype float32", False),
    ("window_attn_backward", "out dtype", _f(out=lambda x: x["out"].double()), r"out must have dtype float32", False),
    ("window_attn_backward", "k heads", _f(k=lambda x: x["k"][:, :1]), r"window_attn_backward: v must have shape", False),
    ("gather_hidden", "empty list", _set("hidden", []), r"gather_hidden: hidden must be a non-empty list", False),
    ("gather_hidden", "layer shape", _f(hidden=lambda x: x["hidden"][:2] + [x["hidden"][2][:, :4]]), r"hidden\[2\] must have shape \[B, T, H\] = \[2, 5, 8\]", False),
    ("gather_hidden", "layer dtype", _f(hidden=lambda x: x["hidden"][:1] + [x["hidden"][1].half()]), r"hidden\[1\] must have dtype float32", False),
    ("gather_hidden", "hidden rank", _f(hidden=lambda x: [h[0] for h in x["hidden"]]), r"hidden\[0\] must have shape", False),
    ("gather_hidden", "index dtype", _f(index=lambda x: x["index"].int()), r"index must have dtype int64", False),
    ("gather_hidden", "index batch", _f(index=lambda x: x["index"][:1]), r"index must have shape \[B, N\] = \[2, \?\]", False),
    ("gather_hidden", "strided hidden", _f(hidden=lambda x: [h.repeat_interleave(2, -1)[..., ::2] for h in x["hidden"]]),
     r"hidden\[0\] must be contiguous in its last dimension", False),
    ("gather_hidden", "index = T", _f(index=lambda x: x["index"].clone().fill_(5)), r"index values must be in \[-1, T\) = \[-1, 5\), got index\[0, 0\] = 5", True),
    ("gather_hidden", "index = -2", _f(index=lambda x: torch.where(x["index"] == 1, -2, x["index"])), r"index values must be in .* got index\[1, 2\] = -2", True),
    ("tree_verify_greedy", "candidates rank", _f(candidates=lambda x: x["candidates"][0]), r"tree_verify_greedy: candidates must have shape \[B, N\]", False),
    ("tree_verify_greedy", "predict dtype", _f(target_predict=lambda x: x["target_predict"].int()), r"target_predict must have dtype int64", False),
    ("tree_verify_greedy", "links shape", _f(next_sibling=lambda x: x["next_sibling"][:, :2]), r"next_sibling must have shape \[B, N\] = \[1, 3\]", False),
    ("tree_verify_greedy", "N = 0", _f(**{n: (lambda n: lambda x: x[n][:, :0])(n) for n in ("candidates", "target_predict", "next_token", "next_sibling")}),
     r"N >= 1", False),
    ("tree_verify_greedy", "next_token past N", _f(next_token=lambda x: x["next_token"] + 3), r"next_token values must be -1 or a later node", True),
    ("tree_verify_greedy", "next_sibling backwards", _f(next_sibling=lambda x: torch.tensor([[-1, -1, 1]], device=x["next_sibling"].device)),
     r"next_sibling values must be -1 or a later node in \(i, N\) = \(2, 3\), got next_sibling\[0, 2\] = 1", True),
    ("tree_verify_sample", "target dtype", _f(target_probs=lambda x: x["target_probs"].half()), r"tree_verify_sample: target_probs must have dtype float32", False),
    ("tree_verify_sample", "draft V", _f(draft_probs=lambda x: x["draft_probs"][..., :3]), r"draft_probs must have shape \[B, N, V\] = \[1, 3, 4\]", False),
    ("tree_verify_sample", "uniform_final shape", _f(uniform_final=lambda x: x["uniform_final"][None]), r"uniform_final must have shape \[B\]", False),
    ("tree_verify_sample", "uniform dtype", _f(uniform_accept=lambda x: x["uniform_accept"].double()), r"uniform_accept must have dtype float32", False),
    ("tree_verify_sample", "strided probs", _f(target_probs=lambda x: x["target_probs"].repeat_interleave(2, -1)[..., ::2]),
     r"target_probs must be contiguous in its last dimension", False),
    ("tree_verify_sample", "candidate >= V", _f(candidates=lambda x: x["candidates"] + 4), r"candidates values must be in \[0, V\) = \[0, 4\)", True),
    ("tree_verify_sample", "candidate < 0", _f(candidates=lambda x: x["candidates"] - 9), r"candidates values must be in", True),
    ("kv_compact", "kv rank", _f(kv=lambda x: x["kv"][0]), r"kv_compact: kv must have shape \[L, B, H, S, D\]", False),
    ("kv_compact", "kv strided", _f(kv=lambda x: x["kv"].transpose(3, 4)), r"kv must be contiguous", False),
    ("kv_compact", "prefix dtype", _f(prefix_len=lambda x: x["prefix_len"].int()), r"prefix_len must have dtype int64", False),
    ("kv_compact", "accept_index batch", _f(accept_index=lambda x: x["accept_index"][:1]), r"accept_index must have shape \[B, A\] = \[2, \?\]", False),
    ("kv_compact", "accept_len > A", _f(accept_len=lambda x: x["accept_len"] + torch.tensor([0, 1], device=x["kv"].device)), r"accept_len values must be in \[0, A\] = \[0, 3\], got accept_len\[1\] = 4", True),
    ("kv_compact", "accept_len < 0", _f(accept_len=lambda x: x["accept_len"] - 3), r"accept_len values must be in", True),
    ("kv_compact", "prefix < 0", _f(prefix_len=lambda x: x["prefix_len"] - 3), r"prefix_len values must be >= 0", True),
    ("kv_compact", "not increasing", _f(accept_index=lambda x: torch.tensor([[2, 0, -1], [0, 1, 4]], device=x["kv"].device)),
     r"accept_index must be strictly increasing", True),
    ("kv_compact", "negative index", _f(accept_index=lambda x: torch.tensor([[-1, 0, -1], [0, 1, 4]], device=x["kv"].device)),
     r"accept_index values must be >= 0", True),
    ("kv_compact", "index past S", _f(accept_index=lambda x: torch.tensor([[0, 6, -1], [0, 1, 5]], device=x["kv"].device)),
     r"must be < S = 8, got prefix_len\[0\] \+ accept_index\[0, 1\] = 8", True),
]


@pytest.mark.parametrize("op,case,edit,message,reads_values", BAD, ids=[f"{op}-{case}" for op, case, *_ in BAD])
def test_bad_input_raises_naming_the_argument(any_backend, op, case, edit, message, reads_values):
    if reads_values and any_backend.device.type != "cpu":
        pytest.skip("index/length range checks read tensor values: done on the host for CPU tensors only")
    fn, make = OPS[op]
    kwargs = edit(make(any_backend.device))
    with any_backend.use(), pytest.raises((RuntimeError, ValueError), match=message) as err:
        fn(**kwargs)
    assert str(err.value).lstrip().startswith(op) or f"{op}:" in str(err.value)


@pytest.mark.parametrize("op", list(OPS))
def test_valid_inputs_of_the_error_cases_pass(any_backend, op):
    """The inputs edited above are valid as they are: each error comes from the edit."""
    fn, make = OPS[op]
    with any_backend.use():
        fn(**make(any_backend.device))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for a second device")
@pytest.mark.parametrize("op,arg", [("window_attn", "kv_len"), ("window_attn", "k"), ("gather_hidden", "index"),
                                    ("tree_verify_sample", "target_probs"), ("kv_compact", "accept_len")])
def test_tensors_on_different_devices(any_backend, op, arg):
    if any_backend.device.type != "cuda":
        pytest.skip("needs a backend whose tensors live on the GPU")
    fn, make = OPS[op]
    kwargs = make(any_backend.device)
    kwargs[arg] = kwargs[arg].cpu()
    with any_backend.use(), pytest.raises((RuntimeError, ValueError), match=rf"{arg} must (be on device|have)"):
        fn(**kwargs)


@pytest.mark.parametrize("op", ["window_attn", "gather_hidden", "kv_compact"])
def test_meta_tensor_mixed_with_cpu_is_rejected(op):
    """Without a GPU, a meta tensor stands in for 'another device' on the C++ path."""
    fn, make = OPS[op]
    kwargs = make("cpu")
    arg = {"window_attn": "kv_len", "gather_hidden": "index", "kv_compact": "prefix_len"}[op]
    kwargs[arg] = kwargs[arg].to("meta")
    with sparrow_kernels.use_backend("cpu"), pytest.raises((RuntimeError, ValueError), match=rf"{arg} must be on device cpu"):
        fn(**kwargs)


# ----------------------------------------------------------------------------- import-time errors
def test_import_without_the_extension_says_how_to_build():
    code = "import sys; sys.modules['sparrow_kernels._C'] = None; import sparrow_kernels"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "ImportError" in run.stderr and "pip install -e . --no-build-isolation" in run.stderr, run.stderr[-2000:]


def test_build_for_another_torch_is_reported_before_loading(monkeypatch):
    info = pytest.importorskip("sparrow_kernels._build_info")
    monkeypatch.setattr(info, "TORCH_VERSION", "1.13.0+cu117")
    with pytest.raises(ImportError, match=r"built for torch 1.13.0\+cu117 .* rebuild"):
        sparrow_kernels._check_build_matches_torch()
