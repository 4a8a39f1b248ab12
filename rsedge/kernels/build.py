"""Build rsedge's kernels for this machine: the C source compiled once per machine, kept in the user's cache.

A kernel is compiled with ``-march=native`` (or ``-mcpu=native`` on Arm): its vector code is this CPU's, so the
library is built where it runs, not shipped. It needs a C compiler (``cc``, or ``$CC``) and onnxruntime's C API
header, ``onnxruntime_c_api.h``, which no onnxruntime wheel carries: it is found in ``$RSEDGE_ORT_INCLUDE``, in
the per-user folder ``scripts/fetch_ort_headers.sh`` fills (``$XDG_CACHE_HOME/rsedge/ort-include``), or where a
system package installs it (``/usr/include/onnxruntime``, ``/usr/local/include/onnxruntime``). The kernels ask
onnxruntime for C API version 17, so a header of any later release builds a library every onnxruntime >= 1.17
loads.

A library is keyed by a sha256 of its source, the compiler's version, its flags and this CPU's identity, built in a
temporary file and renamed into place (two processes building at once both succeed), and never trusted blindly:
a library whose recorded digest no longer matches is rebuilt.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from rsedge.runtime.bundle import sha256_file
from rsedge.runtime.graph_cache import cpu_identity

SOURCES = {"gqa_decode": Path(__file__).with_name("gqa_decode.c")}
HEADER = "onnxruntime_c_api.h"
CACHE_DIR = "kernels-v1"
# -fno-math-errno / -fno-trapping-math let the exp and max loops vectorize; -ffp-contract=fast fuses multiply-adds;
# -fopenmp-simd honours the source's `omp simd` loops without linking an OpenMP runtime (onnxruntime's own threads
# run the kernel).
FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast",
         "-fopenmp-simd", "-fvisibility=default", "-Wno-psabi"]


class KernelUnavailable(RuntimeError):
    """A kernel cannot be used on this machine; the message says why and what would fix it."""


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "rsedge"


def header_dirs() -> list[Path]:
    """Where onnxruntime's C API header is looked for, first match wins."""
    dirs = [Path(p) for p in os.environ.get("RSEDGE_ORT_INCLUDE", "").split(os.pathsep) if p]
    system = [Path("/usr/include/onnxruntime"), Path("/usr/local/include/onnxruntime")]
    return [*dirs, _cache_root() / "ort-include", *system]


def find_header() -> Path:
    for d in header_dirs():
        if (d / HEADER).is_file():
            return d
    raise KernelUnavailable(
        f"onnxruntime's C API header ({HEADER}) was not found in {', '.join(str(d) for d in header_dirs())}; "
        "run scripts/fetch_ort_headers.sh or set RSEDGE_ORT_INCLUDE"
    )


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise KernelUnavailable("no C compiler (cc or $CC) to build rsedge's kernels; install gcc")
    return cc


def _arch_flags() -> list[str]:
    return ["-mcpu=native"] if platform.machine().lower() in ("aarch64", "arm64") else ["-march=native"]


@cache
def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"the C compiler {cc} does not run: {e}") from None
    return out.splitlines()[0] if out else cc


def library(name: str = "gqa_decode") -> Path:
    """The shared library of kernel ``name`` for this machine, built now if the cache lacks it."""
    source = SOURCES[name]
    cc = _compiler()
    include = find_header()
    flags = [*FLAGS, *_arch_flags()]
    key = hashlib.sha256(
        "\n".join([sha256_file(source), sha256_file(include / HEADER), _compiler_version(cc), " ".join(flags),
                   cpu_identity()]).encode()
    ).hexdigest()[:24]
    folder = _cache_root() / CACHE_DIR / key
    lib, digest = folder / f"lib{name}.so", folder / f"lib{name}.so.sha256"
    if lib.is_file() and digest.is_file() and digest.read_text().strip() == sha256_file(lib):
        return lib
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".lib{name}-", suffix=".so", dir=folder)
        os.close(fd)
    except OSError as e:
        raise KernelUnavailable(f"cannot write the kernel cache {folder}: {e.strerror or e}") from None
    try:
        proc = subprocess.run([cc, *flags, f"-I{include}", str(source), "-o", tmp, "-lm", "-lpthread"],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise KernelUnavailable(f"compiling {source.name} with {cc} failed: {last}")
        os.replace(tmp, lib)
    except subprocess.TimeoutExpired:
        raise KernelUnavailable(f"compiling {source.name} with {cc} took over 300 s") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    digest.write_text(sha256_file(lib) + "\n")
    return lib
