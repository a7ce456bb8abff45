"""4-bit weights: group-wise symmetric quantization, packed two codes per byte.

A weight [lead..., in..., out...] is quantized in groups of `g` consecutive inputs along its
last input axis (g = `group_size`: 128 for every Llama 2 shape), one float32 scale per group
and output channel: s = max|w| / 7, codes round(w / s) in [-7, 7] (4-bit two's complement).
Codes are stored in uint8, two per byte, within each group: byte j of a group holds input j
in its low nibble and input j + g/2 in its high one. The packed array `q` is the weight's
shape with the last input axis split into [groups, g/2]: its layer slices, shardings and
[in, out] views are the weight's, and no step reshapes it (XLA:TPU copied a [in/2, out]
array to view it as [groups, g/2, out]).

Why packed bytes and not JAX's native int4 dtype (measured with the compilers, see
benchmarks/RESULTS.md "4-bit weights"): XLA:CPU widened a stacked int4 array to a byte per
value in a scanned decode step (7.8 GB of temporaries for a 7B model, whose int4 layers take
3.2 GB) and updates a layer of it slowly; XLA:TPU (v5e) materialised a bf16 copy of each int4
weight before the decode dot (4x the HBM traffic of int8). Unpacking bytes with two shifts is
plain elementwise work that XLA:TPU and XLA:GPU fuse into the dot's operand:

  decode (at most DOT_ROWS rows): per group, two dots of half a group each (x's first and
    second g/2 inputs with the low and high nibbles), the scales applied to the per-group
    products: no dequantized copy of the weight (XLA:TPU: no temporaries);
  prefill (more rows): the weight dequantized to the activations' dtype, then one dot.

XLA:CPU fuses nothing into a dot: there a weight is unpacked, scaled and multiplied a few
groups at a time in a loop (llama2_jax.model.cpu_matmul), for every number of rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from llama2_jax.model import cpu_matmul
from llama2_jax.model.config import ConfigError

f32 = jnp.float32
GROUP = 128  # inputs per scale along the last input axis (fewer where that axis is shorter)
QMAX = 7.0
DOT_ROWS = 32  # up to this many rows multiply group by group (see the module docstring)


def group_size(n: int, name: str = "a weight") -> int:
    """The group along an input axis of n values: the largest even divisor of n up to GROUP
    (128 for every Llama 2 shape; 88 for the demo model's 352), or n itself (one scale per
    output channel, as int8) where that divisor would be under GROUP / 8."""
    g = next((d for d in range(min(GROUP, n), 1, -1) if n % d == 0 and d % 2 == 0), 0)
    if g * 8 >= min(GROUP, n):
        return g
    if n % 2:
        raise ConfigError(f"int4 quantization of {name}: its input axis of {n} values cannot be "
                          "split into groups of an even size (two codes per byte)")
    return n


def quantize(w: jax.Array, last: int, name: str = "a weight"
             ) -> tuple[jax.Array, jax.Array, int]:
    """w (float32) quantized along axis `last` (its last input axis): (packed uint8 codes
    [..., groups, g/2, out...], float32 scales [..., groups, out...], the group size g)."""
    g = group_size(w.shape[last], name)
    split = w.shape[:last] + (w.shape[last] // g, g) + w.shape[last + 1:]
    wg = w.reshape(split)
    amax = jnp.max(jnp.abs(wg), axis=last + 1)  # [..., groups, out...]
    scale = jnp.where(amax > 0, amax / QMAX, 1.0)
    codes = jnp.clip(jnp.round(wg / jnp.expand_dims(scale, last + 1)), -8, 7).astype(jnp.int8)
    lo, hi = jnp.split(codes, 2, axis=last + 1)
    packed = (lo & 0xF) | (hi << 4)  # int8 arithmetic: the high nibble's sign bit wraps
    return packed.astype(jnp.uint8), scale, g


def nibbles(q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(low, high) int8 codes of packed bytes `q`: each group's first and last g/2 inputs."""
    b = q.astype(jnp.int8)
    return jnp.left_shift(b, 4) >> 4, b >> 4  # arithmetic shifts: sign-extended nibbles


def unpack(q: jax.Array, last: int) -> jax.Array:
    """int8 codes [..., groups, g, out...] of packed `q` [..., groups, g/2, out...] (its
    groups axis `last`)."""
    return jnp.concatenate(nibbles(q), axis=last + 1)


def dequantize(q: jax.Array, scale: jax.Array, last: int, dtype) -> jax.Array:
    """The weight (its logical shape) in `dtype`: codes times their group's scale."""
    w = unpack(q, last).astype(f32) * jnp.expand_dims(scale, last + 1)
    shape = q.shape[:last] + (q.shape[last] * q.shape[last + 1] * 2,) + q.shape[last + 2:]
    return w.reshape(shape).astype(dtype)


def matmul(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """x [..., in] @ the [in, out] weight of packed q [groups, g/2, out], scales [groups,
    out], in float32. On CPU a chunk of groups at a time (llama2_jax.model.cpu_matmul)."""
    return jax.lax.platform_dependent(x, q, scale, cpu=chunked_matmul, default=fused_matmul)


def chunked_matmul(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """The CPU form: a few groups unpacked, scaled and multiplied per loop iteration."""
    n_groups, half, out = q.shape
    xg = x.reshape(*x.shape[:-1], n_groups, 2 * half)  # [..., groups, g]

    def part(i, k):
        xc = lax.dynamic_slice_in_dim(xg, i * k, k, xg.ndim - 2)  # [..., k, g]
        s = lax.dynamic_slice_in_dim(scale, i * k, k, 0)[:, None]  # [k, 1, out]
        codes = nibbles(lax.dynamic_slice_in_dim(q, i * k, k, 0))  # 2 x [k, g/2, out]
        y = 0.0
        for c, xs in zip(codes, (xc[..., :half], xc[..., half:])):
            w = (c.astype(f32) * s).reshape(k * half, out).astype(x.dtype)
            y = y + jnp.einsum("...i,io->...o", xs.reshape(*xs.shape[:-2], k * half), w,
                               preferred_element_type=f32)
        return y

    return cpu_matmul.accumulate(x, n_groups, half * out * 4, part)


def fused_matmul(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """The forms XLA:TPU and XLA:GPU fuse: group by group for few rows, else through the
    dequantized weight."""
    rows = x.size // x.shape[-1]
    if rows > DOT_ROWS:
        w = dequantize(q, scale, 0, x.dtype)
        return jnp.einsum("...i,io->...o", x, w, preferred_element_type=f32)
    n_groups, half, out = q.shape
    g = 2 * half
    lo, hi = nibbles(q)  # [groups, g/2, out]
    xg = x.reshape(*x.shape[:-1], n_groups, g)
    y = (jnp.einsum("...ki,kio->...ko", xg[..., :g // 2], lo.astype(x.dtype),
                    preferred_element_type=f32)
         + jnp.einsum("...ki,kio->...ko", xg[..., g // 2:], hi.astype(x.dtype),
                      preferred_element_type=f32))  # [..., groups, out]
    return jnp.einsum("...ko,ko->...o", y, scale)
