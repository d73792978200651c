"""Post-install smoke test (`python -m sparrow_kernels.smoke`): the compiled ops load and agree
with the reference on CPU, and the quick demo runs. Used by CI on the built wheel; it is no
substitute for the test suite and must stay fast (well under a minute)."""
from __future__ import annotations

import sys

import torch


def check_ops() -> None:
    import sparrow_kernels
    from sparrow_kernels import ops
    from sparrow_kernels.ops import reference

    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, Tq, Tk, D = 2, 4, 2, 3, 40, 32
    q = torch.randn(B, Hq, Tq, D, generator=g)
    k = torch.randn(B, Hkv, Tk, D, generator=g)
    v = torch.randn(B, Hkv, Tk, D, generator=g)
    kv_len = torch.tensor([Tk, Tk - 7])
    q_pos = kv_len[:, None] - Tq + torch.arange(Tq)
    with sparrow_kernels.use_backend("cpu"):
        out, lse = ops.window_attn(q, k, v, kv_len, q_pos, 8, 2, None, 0.0)
    ref_out, ref_lse = reference.window_attn(q, k, v, kv_len, q_pos, 8, 2, None, 0.0)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    hidden = [torch.randn(B, 9, 16, generator=g) for _ in range(3)]
    index = torch.tensor([[0, 8, -1], [3, 3, 1]])
    torch.testing.assert_close(torch.ops.sparrow.gather_hidden(hidden, index), reference.gather_hidden(hidden, index))
    print(f"smoke: sparrow ops OK (torch {torch.__version__}, sparrow_kernels {sparrow_kernels.__version__})")


def main() -> int:
    check_ops()
    from sparrow_kernels.cli import main as cli_main

    return cli_main(["demo", "--quick", "--max-new-tokens", "24", "--visual-tokens", "512"])


if __name__ == "__main__":
    sys.exit(main())
