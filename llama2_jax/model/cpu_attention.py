"""Decode attention on CPU as a custom call: cpu_attention.cc, compiled for this host on first
use and registered with XLA (`jax.ffi`).

Why: XLA:CPU runs a decode step's batched attention dots as one small matrix-vector product per
(row, head), one after the other on one core, and over every position of the step's `attend`
bucket, which the longest row sets. Served with 16 rows of up to 640 positions (BENCH_134M),
that made attention 84% of a step's op time (benchmarks/RESULTS.md, "Third look: where a served
run's time goes"). The kernel reads only each row's own positions, on all of XLA's intra-op
threads.

The library is built with the host's C++ compiler (`$CXX`, else c++ / g++ / clang++) against
the XLA FFI headers that jaxlib ships, once per (source, jaxlib, compiler, CPU), into
`$LLAMA2_JAX_KERNEL_DIR` (default ~/.cache/llama2_jax/kernels). `LLAMA2_JAX_CPU_KERNELS=0`
turns it off. Where that fails (no compiler, a
read-only home), `available()` says False once, with the reason in a warning, and decode
attention stays XLA's: the kernel is an optimisation, never a requirement.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

TARGET = "llama2_jax_decode_attention"
SOURCE = Path(__file__).with_name("cpu_attention.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
         # float sums may be reordered (vectorised); no errno from exp
         "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math")
CACHE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMA2_JAX_KERNEL_DIR")
                or Path.home() / ".cache" / "llama2_jax" / "kernels")


def build(compiler: str | None = None) -> Path:
    """The compiled library (built now unless an identical build is cached). Raises
    RuntimeError naming the compiler's error where it fails."""
    compiler = compiler or _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found ($CXX, c++, g++, clang++)")
    include = jax.ffi.include_dir()
    key = hashlib.sha256("\0".join([
        SOURCE.read_text(), jaxlib.__version__, compiler, *FLAGS, _cpu_signature(),
    ]).encode()).hexdigest()[:16]
    out = cache_dir() / f"cpu_attention-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: a concurrent build or an interrupted one
    # never leaves a partial library under the final name.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *FLAGS, f"-I{include}", "-o", tmp, str(SOURCE)],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE} (exit {proc.returncode}):\n"
                               f"{proc.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered (once per process; False with a warning
    where it cannot be: decode attention then stays XLA's)."""
    if os.environ.get("LLAMA2_JAX_CPU_KERNELS", "1") == "0":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.Llama2JaxDecodeAttention),
                                    platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"llama2_jax: CPU decode attention kernel unavailable, XLA's is used "
                      f"instead: {e}", RuntimeWarning, stacklevel=2)
        return False
    return True


def supports(q: jax.Array, keys, values) -> bool:
    """Whether the kernel takes these: a float32 query and float32 / bfloat16 blocks of one
    layer ([R, K, S, H] or [K, S, H]; not 8-bit, not a stacked [L, ...] cache)."""
    blocks = [*keys, *values]
    return (q.dtype == jnp.float32 and all(isinstance(b, jax.Array) for b in blocks)
            and len({b.dtype for b in blocks}) == 1 and blocks[0].dtype in CACHE_DTYPES
            and all(b.ndim in (3, 4) for b in blocks))


def decode_attention(q: jax.Array, keys, values, positions: jax.Array) -> jax.Array:
    """Attention of q [B, K, G, H] float32 (one position per row) over a row group's blocks
    keys / values [R, K, S_j, H] (R >= B; [K, S_j, H] where R = 1), row b over its positions
    0..positions[b] only. Rows whose position is outside the blocks get zeros. [B, K, G, H]."""
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q, positions.astype(jnp.int32), *keys, *values)
