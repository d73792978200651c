#!/usr/bin/env bash
# The sanitizer job (.ci/run calls it; runs standalone too): builds the C++ CPU sources with
# -fsanitize=address,undefined in a copy of the working tree (the checkout's own _C is left
# alone), then, with the ASan runtime preloaded into python, runs the op tests on the C++
# CPU backend, the compiled-draft tests and a seeded fuzz of every op's index arguments.
# Usage: tests/ops/run_sanitized.sh [WORK_DIR]   (env: FUZZ_SECONDS=60, MAX_JOBS=2)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${1:-$(mktemp -d)}
SRC="$WORK/asan-src"
stamp() { echo "== [sanitizer $(date +%T)] $*"; }

stamp "copy the working tree to $SRC"
rm -rf "$SRC" && mkdir -p "$SRC"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$SRC")
# sparrow_kernels.triton_ops comes from the top-level triton_ops/ (setup.py maps it)
ln -s ../triton_ops "$SRC/sparrow_kernels/triton_ops"

stamp "build _C with ASan + UBSan (CPU only)"
(cd "$SRC" && SPARROW_CUDA=0 SPARROW_SANITIZE=1 SPARROW_WERROR=0 MAX_JOBS=${MAX_JOBS:-2} \
   python setup.py -q build_ext --inplace >"$WORK/asan-build.log" 2>&1) || { tail -40 "$WORK/asan-build.log"; exit 1; }

LIBASAN=$(gcc -print-file-name=libasan.so)
[ -f "$LIBASAN" ] || { echo "sanitizer job: gcc has no libasan.so ($LIBASAN)"; exit 1; }
# libstdc++ too: python does not link it, and without it ASan's __cxa_throw interceptor finds
# no real __cxa_throw and aborts on the first C++ exception (every TORCH_CHECK)
export LD_PRELOAD="$LIBASAN $(gcc -print-file-name=libstdc++.so)"
# Python leaks by design; any error report aborts the process (UBSan too: -fno-sanitize-recover)
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
export SPARROW_TEST_BACKENDS=cpu   # the reference and the C++ CPU kernels (no Triton interpreter)
cd "$SRC"
python -c "import sparrow_kernels, os; f = sparrow_kernels.__file__; assert f.startswith(os.getcwd()), f"

stamp "op tests + compiled-draft tests under ASan/UBSan"
python -m pytest -q -p no:cacheprovider -x -m "not slow and not cuda" tests/ops tests/speculative/test_cpu_draft.py tests/speculative/test_cpu_draft_inputs.py

stamp "seeded fuzz of every op's index arguments"
python tests/ops/fuzz_ops.py --seed 17 --seconds "${FUZZ_SECONDS:-60}"
stamp "sanitizer job passed"
