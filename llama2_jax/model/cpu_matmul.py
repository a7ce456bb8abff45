"""Quantized-weight matmuls as XLA:CPU runs them well: the weight converted a chunk of its inputs
at a time, inside a loop.

XLA:CPU cannot fuse a weight's conversion (8-bit or 4-bit codes to the activations' dtype)
into its dot, so every quantized weight is first converted whole. Worse, its scheduler places
those conversions before the first dot (they depend on the weights alone): a step holds every
converted weight of a layer at once (7B int4, scanned: 0.81 GB of float32, plus 0.52 GB for the
output matrix; unrolled 7B layers: all of them, 26 GB), and each conversion streams a weight
through memory twice. Here a weight is multiplied in a `fori_loop` over chunks of its input
axis, whose body the scheduler cannot hoist: each chunk (about CHUNK_BYTES of float32, a few
hundred inputs) is converted, scaled and multiplied while it is still in the cache, and added to
a float32 accumulator. Measured on this CPU (benchmarks/RESULTS.md, "Quantized matmuls on
XLA:CPU, a chunk at a time"): the scanned 7B int4 decode step's temporaries 1.35 GB -> 0.12 GB,
and BENCH_134M decodes 1.15-1.2x faster in int8 / int4 than in float32 (0.15x before).

Here: the loop (`accumulate`) and 8-bit weights' chunks; int4's chunks are unpacked in
llama2_jax.model.int4, which owns its layout. Picked on CPU only (`lax.platform_dependent` in
quant and int4): XLA:TPU and XLA:GPU fuse the conversion into the dot, and a loop would split
their dots.

The loop body is rematerialised under differentiation (`jax.checkpoint`): the backward pass of a
LoRA step on a quantized base converts each chunk again instead of keeping every chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

f32 = jnp.float32
CHUNK_BYTES = 6 << 20  # float32 bytes of weight converted per loop iteration (decode)
ROWS_PER_CHUNK = 32  # a step of more rows converts CHUNK_BYTES per this many rows (8x at most)


def chunk_units(n: int, unit_bytes: int, limit: int = CHUNK_BYTES) -> int:
    """How many input units (rows of an 8-bit weight, groups of an int4 one) one iteration
    converts: the largest proper divisor k of n with k * unit_bytes <= limit (1 at least).
    Never all of them: XLA removes a loop of one iteration, and the conversion, out of any
    loop, is hoisted again (a small model's every layer converted first)."""
    fits = max(1, min(limit // max(unit_bytes, 1), n // 2))
    return max(d for d in range(1, fits + 1) if n % d == 0)


def _limit(x: jax.Array) -> int:
    """Bytes converted per iteration: more for many rows (prefill), whose dots then stay long
    enough along their inputs to run at matrix-multiply speed."""
    rows = x.size // x.shape[-1]
    return CHUNK_BYTES * min(max(rows // ROWS_PER_CHUNK, 1), 8)


def accumulate(x: jax.Array, n_units: int, unit_bytes: int, part) -> jax.Array:
    """The float32 sum over chunks of `part(i, k)`: chunk i's product, k input units (of
    `unit_bytes` converted each, `n_units` in all) per chunk, in a `fori_loop`."""
    k = chunk_units(n_units, unit_bytes, _limit(x))
    chunk = jax.checkpoint(lambda i: part(i, k))
    first = jax.eval_shape(chunk, 0)
    return lax.fori_loop(0, n_units // k, lambda i, acc: acc + chunk(i),
                         jnp.zeros(first.shape, f32))


def eight_bit(x: jax.Array, q: jax.Array) -> jax.Array:
    """x [..., in] @ q [in, out] (int8 or float8 codes, unscaled), in float32."""
    fp8 = q.dtype == jnp.float8_e4m3fn
    if fp8:  # XLA:CPU emulates e4m3 arrays, slices included (BENCH_134M: 7 tok/s; 19 so)
        q = lax.bitcast_convert_type(q, jnp.uint8)

    def part(i, k):
        xc = lax.dynamic_slice_in_dim(x, i * k, k, x.ndim - 1)  # [..., k]
        qc = lax.dynamic_slice_in_dim(q, i * k, k, 0)  # [k, out]
        w = lax.bitcast_convert_type(qc, jnp.float8_e4m3fn) if fp8 else qc
        return jnp.einsum("...i,io->...o", xc, w.astype(x.dtype), preferred_element_type=f32)

    return accumulate(x, q.shape[0], q.shape[1] * 4, part)
