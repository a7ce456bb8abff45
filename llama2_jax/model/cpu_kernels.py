"""CPU kernels as XLA custom calls: C++ sources beside this file, compiled for this host on
first use and registered with XLA (`jax.ffi`), and the functions that call them.

  cpu_attention.cc  decode attention (`decode_attention`, used by kv_cache.attention)
  cpu_sampling.cc   the top-k / top-p floor of sampled rows (`nucleus_floor`, used by
                    llama2_jax.inference.sampling)
  cpu_matmul.cc     weight matmuls over tile-packed weights (`matmul`, used by
                    llama2_jax.model.packed)
  cpu_parallel.h    their work shared out to XLA's intra-op threads

Why: XLA:CPU runs a decode step's batched attention dots as one small matrix-vector product per
(row, head), one after the other on one core, and over every position of the step's `attend`
bucket, which the longest row sets: served with 16 rows of up to 640 positions (BENCH_134M),
attention was 84% of a step's op time. The kernel reads only each row's own positions, on all
of XLA's intra-op threads. The sampler's floor search is 32 masked sums over the vocabulary
on XLA; the kernel selects it in about two passes. (benchmarks/RESULTS.md, issue 19.)

The library is built with the host's C++ compiler (`$CXX`, else c++ / g++ / clang++) against
the XLA FFI headers that jaxlib ships, once per (sources, jaxlib, compiler, CPU), into
`$LLAMA2_JAX_KERNEL_DIR` (default ~/.cache/llama2_jax/kernels). `LLAMA2_JAX_CPU_KERNELS=0`
turns it off. Where the build fails (no compiler, a read-only home), `available()` says False
once, with the reason in a warning, and XLA's code runs instead: the kernels are an
optimisation, never a requirement. Callers use them only on one CPU device (a custom call has
no sharding rule).
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

HERE = Path(__file__).parent
SOURCES = (HERE / "cpu_attention.cc", HERE / "cpu_sampling.cc", HERE / "cpu_matmul.cc")
HEADERS = (HERE / "cpu_parallel.h",)  # included by the sources
TARGETS = {"llama2_jax_decode_attention": "Llama2JaxDecodeAttention",
           "llama2_jax_nucleus_floor": "Llama2JaxNucleusFloor",
           "llama2_jax_matmul": "Llama2JaxMatmul"}  # XLA name: C symbol
ATTENTION, FLOOR, MATMUL = TARGETS
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
         # float sums may be reordered (vectorised); no errno from exp
         "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math")
FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))  # caches the kernel reads
QUANTIZED = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))  # as kv_cache.QKV codes


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
    RuntimeError with the compiler's error where it fails."""
    compiler = compiler or _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found ($CXX, c++, g++, clang++)")
    key = hashlib.sha256("\0".join([
        *(s.read_text() for s in SOURCES + HEADERS), jaxlib.__version__, compiler, *FLAGS,
        _cpu_signature()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"cpu_kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: a concurrent build or an interrupted one
    # never leaves a partial library under the final name.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", "-o", tmp,
                               *map(str, SOURCES)], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {', '.join(s.name for s in SOURCES)} "
                               f"(exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def available() -> bool:
    """Whether the kernels are built and registered (once per process; False with a warning
    where they cannot be: XLA's code then runs instead)."""
    if os.environ.get("LLAMA2_JAX_CPU_KERNELS", "1") == "0":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
        warnings.warn(f"llama2_jax: CPU kernels unavailable, XLA's code is used instead: {e}",
                      RuntimeWarning, stacklevel=2)
        return False
    return True


def attention_supports(q: jax.Array, keys, values) -> bool:
    """Whether `decode_attention` takes these: a float32 query and one layer's blocks ([R, K,
    S, H] or [K, S, H]; not a stacked [L, ...] cache), all float32 or all bfloat16 arrays, or
    all 8-bit (kv_cache.QKV: int8 or float8_e4m3fn codes, float32 scales)."""
    blocks = [*keys, *values]
    codes = [getattr(b, "q", b) for b in blocks]
    scaled = [hasattr(b, "q") for b in blocks]
    dtypes = {c.dtype for c in codes}
    return (q.dtype == jnp.float32 and len(dtypes) == 1 and len(set(scaled)) == 1
            and codes[0].dtype in (QUANTIZED if scaled[0] else FLOATS)
            and all(c.ndim in (3, 4) for c in codes))


def decode_attention(q: jax.Array, keys, values, positions: jax.Array) -> jax.Array:
    """Attention of q [B, K, G, H] float32 (one position per row) over a row group's blocks
    keys / values [R, K, S_j, H] (R >= B; [K, S_j, H] where R = 1; arrays, or 8-bit QKV
    blocks), row b over its positions 0..positions[b] only. Rows whose position is outside
    the blocks get zeros. Returns [B, K, G, H] float32."""
    if hasattr(keys[0], "q"):  # the codes, then the scales, of the keys, then the values
        blocks = ([b.q for b in keys] + [b.s for b in keys] + [b.q for b in values]
                  + [b.s for b in values])
    else:
        blocks = [*keys, *values]
    call = jax.ffi.ffi_call(ATTENTION, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q, positions.astype(jnp.int32), *blocks)


def nucleus_floor(x: jax.Array, k: jax.Array, top_p: jax.Array, want: jax.Array) -> jax.Array:
    """[B] float32: for each row of x [B, V] float32 where `want` [B] bool, the smallest value
    that top-k (k [B] int32 in 1..V, V: none) then Meta's top-p (top_p [B]) keep; -inf for the
    other rows. See cpu_sampling.cc."""
    call = jax.ffi.ffi_call(FLOOR, jax.ShapeDtypeStruct(x.shape[:1], jnp.float32))
    return call(x.astype(jnp.float32), k.astype(jnp.int32), top_p.astype(jnp.float32),
                want.astype(jnp.int32))


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] @ W [K, N] in float32, W packed as w [N / T, K, T] float32 or bfloat16
    (llama2_jax.model.packed). See cpu_matmul.cc."""
    if not available():  # registers the kernels on first use
        raise RuntimeError("llama2_jax: a packed weight needs the CPU matmul kernel, which is "
                           "not available here (see the warning above); use the plain array")
    n = w.shape[0] * w.shape[2]
    call = jax.ffi.ffi_call(MATMUL, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))
    return call(x.astype(jnp.float32), w)
