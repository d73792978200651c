"""Builds the `sparrow_kernels` package and its compiled ops `sparrow_kernels._C`.

CPU kernels (csrc/*.cpp) always; CUDA kernels (csrc/cuda/*.cu) when a CUDA toolkit and a
CUDA build of torch are present, or when forced with SPARROW_CUDA=1 (SPARROW_CUDA=0 forces a
CPU-only build). Needs torch at build time: `pip install -e . --no-build-isolation`.
Metadata lives in pyproject.toml; this file only adds what must be computed at build time.

Environment: SPARROW_CUDA=0/1, TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX"), MAX_JOBS,
SPARROW_WERROR=1 (warnings are errors, host code of .cpp and .cu; CI sets it),
SPARROW_DEBUG=1 (keep debug info in the .cpp objects).
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import site
import sys
from pathlib import Path

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as err:  # pragma: no cover - the message is the point
    sys.exit("sparrow_kernels builds against the installed torch: install torch first, then run "
             f"`pip install -e . --no-build-isolation` (or `pip wheel . --no-build-isolation`). ({err})")

ROOT = Path(__file__).resolve().parent
BASE_VERSION = "0.1.0"
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def _env_flag(name: str) -> bool | None:
    """True / False for 1/0-like values, None when unset or empty."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    sys.exit(f"setup.py: {name} must be 0 or 1, got {os.environ[name]!r}")


def _resolve_cuda_home() -> None:
    """torch guesses CUDA_HOME from `which nvcc`; when nvcc is a wrapper script such as
    /usr/local/bin/nvcc (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`) that guess is /usr/local,
    which has no lib64/libcudart. Follow the wrapper to the real toolkit."""
    home = cpp_extension.CUDA_HOME
    if os.environ.get("CUDA_HOME") or home is None or os.path.isdir(os.path.join(home, "lib64")):
        return
    nvcc = os.path.join(home, "bin", "nvcc")
    try:
        text = Path(nvcc).read_text(errors="replace") if os.path.getsize(nvcc) < 4096 else ""
    except OSError:
        return
    for token in text.split():
        if token.endswith("/bin/nvcc") and os.path.isfile(token):
            cpp_extension.CUDA_HOME = os.path.dirname(os.path.dirname(token))
            os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME
            return


_resolve_cuda_home()


def _want_cuda() -> bool:
    forced = _env_flag("SPARROW_CUDA")
    toolkit = cpp_extension.CUDA_HOME is not None
    if forced is True:
        if torch.version.cuda is None or not toolkit:
            sys.exit("setup.py: SPARROW_CUDA=1 but "
                     + ("torch is a CPU-only build" if torch.version.cuda is None else
                        "no CUDA toolkit was found (set CUDA_HOME to the directory holding bin/nvcc)"))
        return True
    if forced is False:
        return False
    return torch.version.cuda is not None and toolkit


def _cuda_wheel_include_dirs() -> list[str]:
    """Headers shipped by torch's CUDA wheels (cuBLAS, cuSPARSE, ... that ATen/cuda includes):
    <site-packages>/nvidia/cu13/include (CUDA 13) and nvidia/cu12/include when present."""
    roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    found = []
    for root in roots:
        for cu in ("cu13", "cu12"):
            path = os.path.join(root, "nvidia", cu, "include")
            if os.path.isdir(path) and path not in found:
                found.append(path)
    return found


def _torch_tag(with_cuda: bool) -> str:
    """Local version tag naming the torch (and CUDA) it was built for, e.g. torch2.14cu130."""
    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    device = "cu" + torch.version.cuda.replace(".", "") if with_cuda else "cpu"
    return f"torch{major_minor}{device}"


def _write_build_info(with_cuda: bool, arch_list: str | None) -> None:
    """sparrow_kernels/_build_info.py: what _C was built for; __init__ compares it at import."""
    text = (
        '"""Written by setup.py at build time: the torch/CUDA this build of _C targets. Do not edit."""\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"CUDA_VERSION = {torch.version.cuda if with_cuda else None!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_ARCH_LIST = {arch_list!r}\n"
    )
    path = ROOT / "sparrow_kernels" / "_build_info.py"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _extension(with_cuda: bool):
    werror = bool(_env_flag("SPARROW_WERROR"))
    # no -std flag: BuildExtension adds the standard the installed torch's headers need
    # (C++17 up to torch 2.9, C++20 from torch 2.10 on)
    cxx_flags = ["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    if not _env_flag("SPARROW_DEBUG"):
        cxx_flags.append("-g0")  # Python's default -g triples compile time and .so size
    if werror:
        cxx_flags.append("-Werror")
    sanitize = bool(_env_flag("SPARROW_SANITIZE"))
    if sanitize:  # .ci/run's sanitizer job: AddressSanitizer + UBSan, CPU sources only, -O1 -g
        if with_cuda:
            sys.exit("setup.py: SPARROW_SANITIZE=1 builds the CPU sources only: set SPARROW_CUDA=0 too")
        cxx_flags = [f for f in cxx_flags if f not in ("-O3", "-g0")] + [
            "-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
            "-fno-wrapv"]  # Python's CFLAGS carry -fwrapv, which hides signed overflow from UBSan
    # at::parallel_for runs its body serially unless the extension itself is built with OpenMP;
    # the libgomp.so.1 it links is the one torch has already loaded (same soname)
    link_flags = ["-fsanitize=address,undefined"] if sanitize else []
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    sources = sorted(glob.glob("csrc/*.cpp"))
    include_dirs = [str(ROOT / "csrc")]
    define_macros = [("SPARROW_PYTHON_MODULE", None)]
    if not with_cuda:
        return cpp_extension.CppExtension(
            "sparrow_kernels._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    if werror:
        # host code of the .cu files; torch headers are -isystem under nvcc, so they stay quiet
        nvcc_flags += ["-Xcompiler=-Wall,-Werror"]
    define_macros.append(("SPARROW_WITH_CUDA", None))
    return cpp_extension.CUDAExtension(
        "sparrow_kernels._C", sources, include_dirs=include_dirs + _cuda_wheel_include_dirs(),
        define_macros=define_macros, extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags)


class _ReusingBuildExt(cpp_extension.BuildExtension):
    """An editable install (`pip install -e .`) builds in a fresh temp dir each time, so a second
    install recompiled every source (the CUDA ones for ~10 minutes). When the in-place _C was
    built from the same sources, flags and torch (recorded in sparrow_kernels/_C.build-key with
    the library's hash), it is reused instead of compiled again."""

    def build_extension(self, ext) -> None:
        inplace = ROOT / self.get_ext_filename(ext.name)
        stamp = inplace.parent / "_C.build-key"
        key = _build_key(ext)
        editable = bool(getattr(self, "editable_mode", False))
        if editable and inplace.is_file() and stamp.is_file() and \
                stamp.read_text().split() == [key, _sha256(inplace)]:
            print(f"sparrow_kernels: reusing {inplace.name} (same sources, flags and torch as its build)",
                  file=sys.stderr)
            target = Path(self.get_ext_fullpath(ext.name))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(inplace, target)
            return
        stamp.unlink(missing_ok=True)
        super().build_extension(ext)
        if editable:  # copied in place after this; record what it was built from
            stamp.write_text(f"{key} {_sha256(Path(self.get_ext_fullpath(ext.name)))}\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _build_key(ext) -> str:
    """Hash of everything the compiled _C depends on: every file under csrc/, setup.py, the
    extension's sources, macros and flags, and the Python / torch / CUDA / arch versions."""
    digest = hashlib.sha256()
    for path in sorted(ROOT.glob("csrc/**/*")) + [ROOT / "setup.py"]:
        if path.is_file():
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    config = (type(ext).__name__, sorted(ext.sources), ext.define_macros, ext.include_dirs, ext.extra_compile_args,
              ext.extra_link_args, sys.version, torch.__version__, torch.version.cuda,
              os.environ.get("TORCH_CUDA_ARCH_LIST"), cpp_extension.CUDA_HOME)
    digest.update(repr(config).encode())
    return digest.hexdigest()


def _packages() -> tuple[list[str], dict[str, str]]:
    """sparrow_kernels and its subpackages, plus the top-level triton_ops/ directory installed
    as sparrow_kernels.triton_ops (so no generic `triton_ops` lands in site-packages)."""
    packages = find_packages(include=["sparrow_kernels", "sparrow_kernels.*"])
    package_dir = {}
    if (ROOT / "triton_ops").is_dir():
        packages.append("sparrow_kernels.triton_ops")
        package_dir["sparrow_kernels.triton_ops"] = "triton_ops"
        for sub in find_packages(where="triton_ops"):
            packages.append(f"sparrow_kernels.triton_ops.{sub}")
            package_dir[f"sparrow_kernels.triton_ops.{sub}"] = os.path.join("triton_ops", *sub.split("."))
    return packages, package_dir


def main() -> None:
    os.chdir(ROOT)  # relative source paths in the Extension
    with_cuda = _want_cuda()
    arch_list = None
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
    _write_build_info(with_cuda, arch_list)
    packages, package_dir = _packages()
    print(f"sparrow_kernels: building _C with {'CUDA (arch ' + arch_list + ')' if with_cuda else 'CPU only'} "
          f"against torch {torch.__version__}", file=sys.stderr)
    setup(
        version=f"{BASE_VERSION}+{_torch_tag(with_cuda)}",
        packages=packages,
        package_dir=package_dir,
        package_data={"sparrow_kernels": ["checkpoints/**/*.safetensors", "checkpoints/**/*.json",
                                     "checkpoints/**/*.jinja"]},
        ext_modules=[_extension(with_cuda)],
        # ninja when installed (parallel, honours MAX_JOBS); plain setuptools otherwise
        cmdclass={"build_ext": _ReusingBuildExt.with_options(use_ninja=cpp_extension.is_ninja_available())},
        zip_safe=False,
    )


main()
