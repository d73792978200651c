"""Every Triton kernel compiles to a cubin for sm_80 and sm_90, the attention kernels for
bf16 and for fp32 with "ieee" dots, with no GPU: the interpreter runs Python control flow the
compiler may reject (loop-carried types, scalar branches, dot shapes, bf16), and this
catches that in CI.
Compilation runs in a subprocess because TRITON_INTERPRET=1 replaces @triton.jit here.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _attention_types(elem: str):
    def types(name: str) -> str:
        if name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr"):
            return f"*{elem}"
        if name in ("kv_len_ptr", "q_pos_ptr"):
            return "*i64"
        if name == "tree_ptr":
            return "*u8"
        if name.endswith("_ptr"):
            return "*fp32"
        return "fp32" if name in ("scale", "scale_log2") else "i32"
    return types


def _tree_types(name: str) -> str:
    if name in ("target_ptr", "draft_ptr", "uniform_accept_ptr", "uniform_final_ptr", "residual_ptr"):
        return "*fp32"
    return "*i64" if name.endswith("_ptr") else "i32"


def kernel_configs(arch: int):
    """(label, module, kernel, arg types, constexprs, num_warps, num_stages) to compile: every
    kernel for every arch, the attention kernels for bf16 (what 7B targets run; neither the
    interpreter nor this machine can execute it) and fp32 with "ieee" dots, with the tile
    configurations the host code picks for them."""
    wa = importlib.import_module("sparrow_kernels.triton_ops.window_attn")  # the module, not the function

    block_d = 64
    configs = []
    for elem, precision, elem_bytes in (("bf16", "tf32", 2), ("fp32", "ieee", 4)):
        attn = _attention_types(elem)
        tree_m, tree_n, tree_warps, tree_stages = wa._forward_config(12 * 3, block_d, elem_bytes)
        dec_m, dec_n, dec_warps, dec_stages = wa._forward_config(7, block_d, elem_bytes)
        dq_m, dq_n, kv_m, kv_n, bwd_warps, bwd_stages = wa._backward_config(block_d, elem_bytes)
        common = dict(BLOCK_D=block_d, DOT_PRECISION=precision)
        configs += [
            (f"window_attn fwd tree {elem}", "window_attn", "_window_attn_fwd_kernel", attn,
             dict(GROUP=3, HAS_TREE=True, NUM_SPLITS=1, BLOCK_M=tree_m, BLOCK_N=tree_n, **common),
             tree_warps, tree_stages),
            (f"window_attn fwd split decode {elem}", "window_attn", "_window_attn_fwd_kernel", attn,
             dict(GROUP=7, HAS_TREE=False, NUM_SPLITS=4, BLOCK_M=dec_m, BLOCK_N=dec_n, **common),
             dec_warps, dec_stages),
            (f"window_attn bwd dq {elem}", "window_attn", "_window_attn_bwd_dq_kernel", attn,
             dict(GROUP=3, HAS_TREE=True, BLOCK_M=dq_m, BLOCK_N=dq_n, **common), bwd_warps, bwd_stages),
            (f"window_attn bwd dk/dv {elem}", "window_attn", "_window_attn_bwd_dkdv_kernel", attn,
             dict(GROUP=3, HAS_TREE=True, BLOCK_M=kv_m, BLOCK_N=kv_n, **common), bwd_warps, bwd_stages),
            (f"merge splits {elem}", "window_attn", "_merge_splits_kernel",
             lambda n, elem=elem: f"*{elem}" if n == "out_ptr" else ("*fp32" if n.endswith("_ptr") else "i32"),
             dict(NUM_SPLITS=4, BLOCK_S=4, BLOCK_D=block_d), 4, 1),
        ]
    # window / n_anchor past 2**31 make Triton specialise them as i64: a second variant
    attn64 = _attention_types("bf16")
    configs += [
        ("window_attn fwd tree bf16, i64 window", "window_attn", "_window_attn_fwd_kernel",
         lambda n: "i64" if n == "window" else attn64(n),   # n_anchor reaches the kernel clamped to Tk
         dict(GROUP=3, HAS_TREE=True, NUM_SPLITS=1, BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d, DOT_PRECISION="tf32"),
         4, 3),
        ("tree_verify_greedy", "tree_verify", "_tree_verify_greedy_kernel",
         lambda n: "*i64" if n.endswith("_ptr") else "i32", dict(BLOCK_N=32), 1, 1),
        ("tree_verify_sample", "tree_verify", "_tree_verify_sample_kernel", _tree_types,
         dict(BLOCK_N=32, BLOCK_V=1024), 4, 1),
        ("gather_hidden", "gather_hidden", "_gather_hidden_kernel",
         lambda n: "*i64" if n == "index_ptr" else ("*bf16" if n.endswith("_ptr") else "i32"),
         dict(N_LAYERS=4, BLOCK_H=256), 2, 1),
        ("kv_compact", "kv_compact", "_kv_compact_kernel",
         lambda n: "*i16" if n == "kv_ptr" else ("*i64" if n.endswith("_ptr") else "i32"),
         dict(BLOCK_D=128), 1, 1),
    ]
    return configs


def test_every_kernel_and_dtype_is_listed():
    """The list above covers every @triton.jit kernel of triton_ops that is launched (not the
    helpers they inline), for both attention dtypes on every arch."""
    launched = set()
    for module in ("window_attn", "tree_verify", "gather_hidden", "kv_compact"):
        mod = importlib.import_module(f"sparrow_kernels.triton_ops.{module}")
        # @triton.jit objects (JITFunction, or InterpretedFunction under TRITON_INTERPRET=1)
        launched |= {name for name, obj in vars(mod).items()
                     if name.endswith("_kernel") and hasattr(obj, "arg_names")}
    for arch in (80, 90):
        configs = kernel_configs(arch)
        assert {c[2] for c in configs} == launched
        labels = " | ".join(c[0] for c in configs)
        for kernel in ("fwd tree", "fwd split decode", "bwd dq", "bwd dk/dv", "merge splits"):
            assert f"{kernel} bf16" in labels and f"{kernel} fp32" in labels, kernel
        assert all(c[4]["DOT_PRECISION"] == "ieee" for c in configs if c[0].endswith("fp32") and "merge" not in c[0])


def compile_all(arch: int) -> None:
    """Compile every config for `arch` (run without TRITON_INTERPRET); prints one line each."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    for label, module, name, types, constexprs, num_warps, num_stages in kernel_configs(arch):
        kernel = getattr(importlib.import_module(f"sparrow_kernels.triton_ops.{module}"), name)
        signature = {arg: "constexpr" if arg in constexprs else types(arg) for arg in kernel.arg_names}
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
        compiled = triton.compile(source, target=target, options=options.__dict__)
        assert compiled.asm.get("cubin"), f"{label}: no cubin for sm_{arch}"
        print(f"sm_{arch} {label}: ok, shared memory {compiled.metadata.shared} bytes", flush=True)


def _ptxas_available() -> bool:
    try:
        from triton import knobs
        return knobs.nvidia.ptxas.path is not None
    except Exception:  # noqa: BLE001 - any failure to locate ptxas means: cannot compile here
        return False


def test_every_kernel_compiles_to_a_cubin():
    """sm_80 and sm_90 compile side by side (one process each: ~15 kernels per arch)."""
    if not _ptxas_available():
        pytest.skip("triton's bundled ptxas is missing: cannot compile cubins on this machine")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in sys.path if p])
    runs = {arch: subprocess.Popen([sys.executable, "-c",
                                    f"from tests.triton.test_triton_compile import compile_all; compile_all({arch})"],
                                   cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for arch in (90, 80)}
    for arch, run in runs.items():
        stdout, stderr = run.communicate(timeout=900)
        assert run.returncode == 0, f"compiling for sm_{arch} failed:\n{stdout}\n{stderr[-6000:]}"
        assert stdout.count(": ok") == len(kernel_configs(arch)), stdout
