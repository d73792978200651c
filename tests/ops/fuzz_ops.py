"""Seeded fuzz of every op's index arguments on the C++ CPU backend, for .ci/run's sanitizer
job (an ASan/UBSan build turns an out-of-bounds access into a crash): first every single
edit of tests/ops/index_extremes.py, then random multi-edit cases until the time budget is
spent, then sparrow_cpu.draft_tree / draft_extend (tests/speculative/test_cpu_draft_inputs.fuzz).
Exits 1 on a broken contract. Not a pytest module; it must not run any GPU code.

    python tests/ops/fuzz_ops.py --seed 0 --seconds 60 [--backend cpu]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.ops.index_extremes import all_cases, random_case, run_case  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=60.0, help="budget for the random multi-edit cases")
    parser.add_argument("--backend", default="cpu", choices=("cpu", "reference"))
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    failures = 0
    singles = all_cases()
    for case in singles:
        try:
            run_case(case, args.backend)
        except AssertionError as err:
            failures += 1
            print(f"FAIL {err}", flush=True)
    t1 = time.monotonic()
    rng = random.Random(args.seed)
    n_random = 0
    while time.monotonic() - t1 < args.seconds:
        case = random_case(rng)
        n_random += 1
        try:
            run_case(case, args.backend)
        except AssertionError as err:
            failures += 1
            print(f"FAIL {err}", flush=True)
    print(f"fuzz_ops: {len(singles)} single-edit + {n_random} random cases (seed {args.seed}) on {args.backend} "
          f"in {time.monotonic() - t0:.0f} s, {failures} failures", flush=True)
    if args.backend == "cpu":     # the compiled draft ops: corrupted and extreme index arguments
        from tests.speculative.test_cpu_draft_inputs import fuzz as fuzz_draft
        n_draft, draft_failures = fuzz_draft(args.seed, 300)
        for msg in draft_failures:
            print(f"FAIL {msg}", flush=True)
        print(f"fuzz_ops: {n_draft} sparrow_cpu.draft_tree / draft_extend cases, {len(draft_failures)} failures")
        failures += len(draft_failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
