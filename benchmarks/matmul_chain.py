"""The floor under a decode step on this CPU: a jitted chain of BENCH_134M's weight matmuls
(12 layers of q/k/v/o and the SwiGLU MLP, then the output matrix; no attention, norms, RoPE
or sampling) at batch 1, 4, 16 and 64, in XLA and in PyTorch, same weights, same process.

  python benchmarks/matmul_chain.py

What it shows: how far batching can raise decode throughput on this machine before any
attention, prefill or scheduling is paid (rows / chain time), and whether XLA:CPU's or
PyTorch's matmuls are faster here (machines differ: see benchmarks/RESULTS.md).

The "packed kernel" column runs the same chain through llama2_jax's CPU matmul kernel over
the weights packed in tiles (llama2_jax.model.packed: what the steps run where the kernels
build), when a C++ compiler is present.

The "[out, in]" column runs the same chain with every weight stored transposed (ggml's layout:
one output's weights contiguous) and contracted on its minor dimension, compiled with the
steps' options: XLA:CPU's matrix-vector product is faster that way at one row and several
times slower at 4 and more (benchmarks/RESULTS.md, issue 19).
"""

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import median, pin_threads  # noqa: E402
from llama2_jax.inference.weights import DEFAULT_OPTIONS  # noqa: E402
from llama2_jax.model import cpu_kernels, packed  # noqa: E402
from llama2_jax.model.config import BENCH_134M  # noqa: E402

BATCHES = (1, 4, 16, 64, 256)
REPS = 20


def chain(x, layers, o, silu, mm=lambda a, w: a @ w):
    """The weight matmuls of a decode step: layers of 2-D (wq, wk, wv, wo, w1, w3, w2), then
    the output matrix `o` (also benchmarks/profile_step.py's floor)."""
    for wq, wk, wv, wo, w1, w3, w2 in layers:
        x = x + mm(mm(x, wq) + mm(x, wk) + mm(x, wv), wo)
        x = x + mm(silu(mm(x, w1)) * mm(x, w3), w2)
    return mm(x, o)


def packed_mm(a, w):
    return w.einsum("BD,DQ->BQ", a)


def chain_out_in(x, layers, o, silu):
    """`chain` with every weight stored [out, in] (the transpose of `chain`'s)."""
    def mm(a, w):
        return jax.lax.dot_general(a, w, (((1,), (1,)), ((), ())))
    for wq, wk, wv, wo, w1, w3, w2 in layers:
        x = x + mm(mm(x, wq) + mm(x, wk) + mm(x, wv), wo)
        x = x + mm(silu(mm(x, w1)) * mm(x, w3), w2)
    return mm(x, o)


def main() -> None:
    threads = os.cpu_count()
    pin_threads(threads)
    torch.set_num_threads(threads)
    cfg = BENCH_134M
    d, f, v = cfg.dim, cfg.ffn_dim, cfg.vocab_size
    rng = np.random.default_rng(0)
    shapes = [(d, d)] * 4 + [(d, f), (d, f), (f, d)]
    weights = [[(rng.standard_normal(s, dtype=np.float32) * 0.02) for s in shapes]
               for _ in range(cfg.n_layers)]
    out = rng.standard_normal((d, v), dtype=np.float32) * 0.02

    jw = [[jnp.asarray(w) for w in layer] for layer in weights]
    jo = jnp.asarray(out)
    run = jax.jit(lambda x, layers, o: chain(x, layers, o, jax.nn.silu))
    # compiled as the library's CPU steps are (EngineOptions.cpu_compiler_options)
    lib = jax.jit(lambda x, layers, o: chain(x, layers, o, jax.nn.silu),
                  compiler_options=dict(DEFAULT_OPTIONS.cpu_compiler_options))
    # the same weights as [out, in], contiguous
    jw_t = [[jnp.asarray(np.ascontiguousarray(w.T)) for w in layer] for layer in weights]
    jo_t = jnp.asarray(np.ascontiguousarray(out.T))
    lib_t = jax.jit(lambda x, layers, o: chain_out_in(x, layers, o, jax.nn.silu),
                    compiler_options=dict(DEFAULT_OPTIONS.cpu_compiler_options))
    kernel = cpu_kernels.available()
    if kernel:  # the same weights packed in tiles, multiplied by the kernel
        jw_p = [[packed.pack(w) for w in layer] for layer in jw]
        jo_p = packed.pack(jo)
        lib_p = jax.jit(lambda x, layers, o: chain(x, layers, o, jax.nn.silu, packed_mm),
                        compiler_options=dict(DEFAULT_OPTIONS.cpu_compiler_options))
    else:
        print("packed kernel: not built here (no C++ compiler?); that column is empty")
    tw = [[torch.from_numpy(w) for w in layer] for layer in weights]
    to = torch.from_numpy(out)
    print(f"BENCH_134M matmul chain, fp32, {threads} threads")
    print("| rows | XLA ms | XLA ms, the steps' options | XLA ms, weights [out, in] | PyTorch ms "
          "| XLA rows/s (tok/s ceiling, the faster of the first two) | XLA / PyTorch time | "
          "[out, in] / the steps' options | packed kernel ms | the steps' options / kernel |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in BATCHES:
        x = jnp.ones((b, d), jnp.float32)
        jax.block_until_ready(run(x, jw, jo))
        jax.block_until_ready(lib(x, jw, jo))
        jax.block_until_ready(lib_t(x, jw_t, jo_t))
        if kernel:
            jax.block_until_ready(lib_p(x, jw_p, jo_p))
        tx = torch.ones(b, d)
        with torch.no_grad():
            chain(tx, tw, to, torch.nn.functional.silu)
            xla, xla_lib, xla_t, pt, kern = [], [], [], [], []
            for _ in range(REPS):  # alternating, so both see the same machine state
                t = time.perf_counter()
                jax.block_until_ready(run(x, jw, jo))
                xla.append(time.perf_counter() - t)
                t = time.perf_counter()
                jax.block_until_ready(lib(x, jw, jo))
                xla_lib.append(time.perf_counter() - t)
                t = time.perf_counter()
                jax.block_until_ready(lib_t(x, jw_t, jo_t))
                xla_t.append(time.perf_counter() - t)
                if kernel:
                    t = time.perf_counter()
                    jax.block_until_ready(lib_p(x, jw_p, jo_p))
                    kern.append(time.perf_counter() - t)
                t = time.perf_counter()
                chain(tx, tw, to, torch.nn.functional.silu)
                pt.append(time.perf_counter() - t)
        a, a_lib, a_t, p = median(xla), median(xla_lib), median(xla_t), median(pt)
        best = min(a, a_lib)
        k = f"{1e3 * median(kern):.1f} | {a_lib / median(kern):.2f}" if kern else " | "
        print(f"| {b} | {1e3 * a:.1f} | {1e3 * a_lib:.1f} | {1e3 * a_t:.1f} | {1e3 * p:.1f} | "
              f"{b / best:.0f} | {best / p:.2f} | {a_t / a_lib:.2f} | {k} |", flush=True)


if __name__ == "__main__":
    main()
