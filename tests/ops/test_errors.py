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


OPS = {"window_attn": (ops.window_attn, window_inputs),
       "window_attn_backward": (ops.window_attn_backward, backward_inputs),
       "gather_hidden": (ops.gather_hidden, gather_inputs),
       "tree_verify_greedy": (ops.tree_verify_greedy, greedy_inputs),
       "tree_verify_sample": (ops.tree_verify_sample, sample_inputs),
       "kv_compact": (ops.kv_compact, compact_inputs)}


def edit(**changes):
    """An edit of the valid inputs: each change is a value or a function of the inputs."""
    return lambda x: {**x, **{k: v(x) if callable(v) else v for k, v in changes.items()}}


def on_device(rows):
    """A constant int64 tensor on the device of the op's inputs."""
    return lambda x: torch.tensor(rows, device=next(t for t in x.values() if isinstance(t, torch.Tensor)).device)


def last_dim_strided(name):
    return lambda x: x[name].repeat_interleave(2, -1)[..., ::2]


def repeat_head_dim(name):
    return lambda x: x[name].repeat(1, 1, 1, 17)


def empty_nodes(name):
    return lambda x: x[name][:, :0]


def bad(op, case, change, message, reads_values=False):
    """One bad-input case: `message` is a regex the error must match; `reads_values` marks
    range checks that read tensor data (done on the host for CPU tensors only)."""
    return pytest.param(op, change, message, reads_values, id=f"{op}-{case}")


WA, WAB, GH, TVG, TVS, KVC = ("window_attn", "window_attn_backward", "gather_hidden", "tree_verify_greedy",
                              "tree_verify_sample", "kv_compact")
BAD = [
    bad(WA, "q rank 3", edit(q=lambda x: x["q"][:, :, 0]), r"window_attn: q must have shape \[B, Hq, Tq, D\]"),
    bad(WA, "k batch", edit(k=lambda x: x["k"][:1], v=lambda x: x["v"][:1]),
        r"k must have shape \[B, Hkv, Tk, D\] = \[2, \?, \?, 16\]"),
    bad(WA, "v heads", edit(v=lambda x: x["v"][:, :1]),
        r"v must have shape \[B, Hkv, Tk, D\] = \[2, 2, 8, 16\], got \[2, 1, 8, 16\]"),
    bad(WA, "k head dim", edit(k=lambda x: x["k"][..., :8]), r"k must have shape"),
    bad(WA, "Hq % Hkv", edit(k=lambda x: x["k"].repeat(1, 3, 1, 1)[:, :3], v=lambda x: x["v"].repeat(1, 3, 1, 1)[:, :3]),
        r"Hq=4 must be a multiple of the kv heads Hkv=3"),
    bad(WA, "dtype mix", edit(k=lambda x: x["k"].half()), r"q, k, v must have the same dtype"),
    bad(WA, "int q", edit(q=lambda x: x["q"].long(), k=lambda x: x["k"].long(), v=lambda x: x["v"].long()),
        r"q must have dtype"),
    bad(WA, "kv_len int32", edit(kv_len=lambda x: x["kv_len"].int()), r"kv_len must have dtype int64, got int32"),
    bad(WA, "kv_len shape", edit(kv_len=lambda x: x["kv_len"][:1]), r"kv_len must have shape \[B\] = \[2\]"),
    bad(WA, "q_pos rank", edit(q_pos=lambda x: x["q_pos"][:, 0]), r"q_pos must have shape \[B, Tq\]"),
    bad(WA, "tree_mask dtype", edit(tree_mask=lambda x: x["tree_mask"].float()), r"tree_mask must have dtype bool"),
    bad(WA, "tree_mask shape", edit(tree_mask=lambda x: x["tree_mask"][:, :2]), r"tree_mask must have shape \[B, Tq, Tq\]"),
    bad(WA, "n_anchor < 0", edit(n_anchor=-1), r"n_anchor must be >= 0, got -1"),
    bad(WA, "head dim > 256", edit(q=repeat_head_dim("q"), k=repeat_head_dim("k"), v=repeat_head_dim("v")),
        r"head dim D must be in \[1, 256\], got 272"),
    bad(WA, "q last dim strided", edit(q=last_dim_strided("q")), r"q must be contiguous in its last dimension"),
    bad(WA, "k last dim strided", edit(k=last_dim_strided("k")), r"k must be contiguous in its last dimension"),
    bad(WA, "kv_len 0", edit(tree_mask=None, kv_len=lambda x: torch.zeros_like(x["kv_len"])),
        r"kv_len must be in \[1, Tk\] = \[1, 8\], got kv_len\[0\] = 0", reads_values=True),
    bad(WA, "kv_len > Tk", edit(kv_len=on_device([8, 9])), r"kv_len must be in .* got kv_len\[1\] = 9", reads_values=True),
    bad(WA, "kv_len < Tq with tree", edit(kv_len=on_device([2, 2])),
        r"kv_len must be in \[Tq \(tree_mask given\), Tk\] = \[3, 8\]", reads_values=True),
    bad(WAB, "grad_out shape", edit(grad_out=lambda x: x["grad_out"][:, :2]),
        r"window_attn_backward: grad_out must have shape"),
    bad(WAB, "lse dtype", edit(lse=lambda x: x["lse"].half()), r"lse must have dtype float32"),
    bad(WAB, "out dtype", edit(out=lambda x: x["out"].double()), r"out must have dtype float32"),
    bad(WAB, "k heads", edit(k=lambda x: x["k"][:, :1]), r"window_attn_backward: v must have shape"),
    bad(GH, "empty list", edit(hidden=[]), r"gather_hidden: hidden must be a non-empty list"),
    bad(GH, "layer shape", edit(hidden=lambda x: x["hidden"][:2] + [x["hidden"][2][:, :4]]),
        r"hidden\[2\] must have shape \[B, T, H\] = \[2, 5, 8\]"),
    bad(GH, "layer dtype", edit(hidden=lambda x: x["hidden"][:1] + [x["hidden"][1].half()]),
        r"hidden\[1\] must have dtype float32"),
    bad(GH, "hidden rank", edit(hidden=lambda x: [h[0] for h in x["hidden"]]), r"hidden\[0\] must have shape"),
    bad(GH, "index dtype", edit(index=lambda x: x["index"].int()), r"index must have dtype int64"),
    bad(GH, "index batch", edit(index=lambda x: x["index"][:1]), r"index must have shape \[B, N\] = \[2, \?\]"),
    bad(GH, "strided hidden", edit(hidden=lambda x: [h.repeat_interleave(2, -1)[..., ::2] for h in x["hidden"]]),
        r"hidden\[0\] must be contiguous in its last dimension"),
    bad(GH, "index = T", edit(index=lambda x: torch.full_like(x["index"], 5)),
        r"index values must be in \[-1, T\) = \[-1, 5\), got index\[0, 0\] = 5", reads_values=True),
    bad(GH, "index = -2", edit(index=on_device([[0, 4, -1], [2, 2, -2]])),
        r"index values must be in .* got index\[1, 2\] = -2", reads_values=True),
    bad(TVG, "candidates rank", edit(candidates=lambda x: x["candidates"][0]),
        r"tree_verify_greedy: candidates must have shape \[B, N\]"),
    bad(TVG, "predict dtype", edit(target_predict=lambda x: x["target_predict"].int()),
        r"target_predict must have dtype int64"),
    bad(TVG, "links shape", edit(next_sibling=lambda x: x["next_sibling"][:, :2]),
        r"next_sibling must have shape \[B, N\] = \[1, 3\]"),
    bad(TVG, "N = 0", edit(**{n: empty_nodes(n) for n in ("candidates", "target_predict", "next_token", "next_sibling")}),
        r"N >= 1"),
    bad(TVG, "next_token past N", edit(next_token=on_device([[4, 2, 2]])), r"next_token values must be -1 or a later node",
        reads_values=True),
    bad(TVG, "next_sibling backwards", edit(next_sibling=on_device([[-1, -1, 1]])),
        r"next_sibling values must be -1 or a later node in \(i, N\) = \(2, 3\), got next_sibling\[0, 2\] = 1",
        reads_values=True),
    bad(TVS, "target dtype", edit(target_probs=lambda x: x["target_probs"].half()),
        r"tree_verify_sample: target_probs must have dtype float32"),
    bad(TVS, "draft V", edit(draft_probs=lambda x: x["draft_probs"][..., :3]),
        r"draft_probs must have shape \[B, N, V\] = \[1, 3, 4\]"),
    bad(TVS, "uniform_final shape", edit(uniform_final=lambda x: x["uniform_final"][None]),
        r"uniform_final must have shape \[B\]"),
    bad(TVS, "uniform dtype", edit(uniform_accept=lambda x: x["uniform_accept"].double()),
        r"uniform_accept must have dtype float32"),
    bad(TVS, "strided probs", edit(target_probs=last_dim_strided("target_probs")),
        r"target_probs must be contiguous in its last dimension"),
    bad(TVS, "candidate >= V", edit(candidates=on_device([[3, 1, 4]])), r"candidates values must be in \[0, V\) = \[0, 4\)",
        reads_values=True),
    bad(TVS, "candidate < 0", edit(candidates=on_device([[3, -1, 2]])), r"candidates values must be in", reads_values=True),
    bad(KVC, "kv rank", edit(kv=lambda x: x["kv"][0]), r"kv_compact: kv must have shape \[L, B, H, S, D\]"),
    bad(KVC, "kv strided", edit(kv=lambda x: x["kv"].transpose(3, 4)), r"kv must be contiguous"),
    bad(KVC, "prefix dtype", edit(prefix_len=lambda x: x["prefix_len"].int()), r"prefix_len must have dtype int64"),
    bad(KVC, "accept_index batch", edit(accept_index=lambda x: x["accept_index"][:1]),
        r"accept_index must have shape \[B, A\] = \[2, \?\]"),
    bad(KVC, "accept_len > A", edit(accept_len=on_device([2, 4])),
        r"accept_len values must be in \[0, A\] = \[0, 3\], got accept_len\[1\] = 4", reads_values=True),
    bad(KVC, "accept_len < 0", edit(accept_len=on_device([-1, 3])), r"accept_len values must be in", reads_values=True),
    bad(KVC, "prefix < 0", edit(prefix_len=on_device([-1, 3])), r"prefix_len values must be >= 0", reads_values=True),
    bad(KVC, "not increasing", edit(accept_index=on_device([[2, 0, -1], [0, 1, 4]])),
        r"accept_index must be strictly increasing", reads_values=True),
    bad(KVC, "negative index", edit(accept_index=on_device([[-1, 0, -1], [0, 1, 4]])), r"accept_index values must be >= 0",
        reads_values=True),
    bad(KVC, "index past S", edit(accept_index=on_device([[0, 6, -1], [0, 1, 4]])),
        r"must be < S = 8, got prefix_len\[0\] = 2 and accept_index\[0, 1\] = 6", reads_values=True),
]


@pytest.mark.parametrize("op,change,message,reads_values", BAD)
def test_bad_input_raises_naming_the_argument(any_backend, op, change, message, reads_values):
    if reads_values and any_backend.device.type != "cpu":
        pytest.skip("index/length range checks read tensor values: done on the host for CPU tensors only")
    fn, make = OPS[op]
    kwargs = change(make(any_backend.device))
    with any_backend.use(), pytest.raises((RuntimeError, ValueError), match=message) as err:
        fn(**kwargs)
    assert f"{op}:" in str(err.value)


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
    with sparrow_kernels.use_backend("cpu"), \
            pytest.raises((RuntimeError, ValueError), match=rf"{arg} must be on device cpu"):
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


def test_check_tensor_names_owner_argument_and_expectation():
    from sparrow_kernels.ops.checks import check_tensor

    x = torch.zeros(2, 3)
    check_tensor("Owner", "x", x, (2, None), torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"Owner: x must have shape \[B, T\] = \[2, 4\], got \[2, 3\]"):
        check_tensor("Owner", "x", x, [("B", 2), ("T", 4)], (torch.float32,))
    with pytest.raises(ValueError, match=r"Owner: x must have dtype int64 or int32, got float32"):
        check_tensor("Owner", "x", x, (2, 3), (torch.int64, torch.int32))
    with pytest.raises(ValueError, match=r"Owner: x must be a tensor of shape \[2, \?\], got list"):
        check_tensor("Owner", "x", [1, 2], (2, None))
    with pytest.raises(ValueError, match=r"Owner: x must be on device meta"):
        check_tensor("Owner", "x", x, (2, 3), None, torch.device("meta"))
