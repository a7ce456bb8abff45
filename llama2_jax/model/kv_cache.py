"""The KV cache: its layouts, how new keys/values are written, and attention over it.

A cache holds keys and values of every layer; slot s of row b holds position s of that row's
sequence. It has one layout, `Blocks`: the rows in groups and the positions in blocks, one
`KVCache` pair of [L, rows, K, positions, H] arrays (L layers, K KV heads, H head dim) per
(group, block); group g holds rows start_g .. start_g + size_g - 1, block j positions
off_j ... A cache of one group and one block is the plain [L, B, K, S, H] layout
(`transformer.init_cache`).

Why blocks: XLA:CPU copies a slice of an array before a dot reads it, so a decode step that
attends over the first `attend` positions of its first `rows` rows, sliced out of one array,
pays for a copy of all of them (BENCH_134M shapes, 12 layers, 16 rows x 512 of 640 positions:
207 ms sliced vs 16 ms in blocks of 128). A step over Blocks reads whole arrays only: the
groups of the rows it runs, the blocks of the positions it attends. Row groups grow
geometrically (1, 3, 12, 48, ...), so 1, 4, 16, 64, ... rows are always whole groups.

Blocks of one layer (a per-layer cache, the unstacked CPU path) are stored without their
size-1 dimensions: [rows, K, S, H], or [K, S, H] for a one-row group. XLA:CPU turns a
size-1 dimension into a bitcast in front of the attention dot, fuses the cache write into it,
and then needs a copy of the block for that fusion on every step; without it the write is in
place and the dot reads the written block itself.

An 8-bit cache (`init_blocks(..., quantization="int8" | "fp8")`) holds each block's keys and
values as a `QKV`: 8-bit codes [..., S, H] and a float32 scale per (position, KV head)
[..., S] (symmetric absmax over the head's H values, as int8 / FP8 weights are quantized
per output channel). They are quantized where they are written; attention multiplies the
scores by the keys' scales and the probabilities by the values' scales, so no dequantized
copy of a block is made. A block's layout (its `ndim`) is its codes'.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from llama2_jax.model import cpu_kernels, sharding

f32 = jnp.float32
KV_METHODS = ("none", "int8", "fp8")
KV_QDTYPE = {"int8": jnp.dtype(jnp.int8), "fp8": jnp.dtype(jnp.float8_e4m3fn)}
KV_QMAX = {"int8": 127.0, "fp8": 448.0}


class QKV(NamedTuple):
    """8-bit keys or values of a block and their scales: x ~ q * s[..., None]."""

    q: jax.Array  # [..., S, H] int8 or float8_e4m3fn
    s: jax.Array  # [..., S] float32

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def ndim(self) -> int:
        return self.q.ndim

    @property
    def dtype(self):
        return self.q.dtype


def check_kv_method(method: str) -> str:
    if method not in KV_METHODS:
        raise ValueError(f"kv_quantization must be one of {', '.join(KV_METHODS)}, "
                         f"got {method!r}")
    return method


def quantize_kv(x: jax.Array, dtype) -> QKV:
    """x [..., H] in 8 bits (`dtype` int8 or float8_e4m3fn), a scale per vector of H."""
    method = "int8" if jnp.dtype(dtype) == KV_QDTYPE["int8"] else "fp8"
    xf = x.astype(f32)
    amax = jnp.max(jnp.abs(xf), axis=-1)
    scale = jnp.where(amax > 0, amax / KV_QMAX[method], 1.0)
    xs = xf / scale[..., None]
    if method == "int8":
        q = jnp.clip(jnp.round(xs), -127, 127).astype(jnp.int8)
    else:
        q = jnp.clip(xs, -448.0, 448.0).astype(jnp.float8_e4m3fn)
    return QKV(q, scale)


def dequantize_kv(x: QKV, dtype) -> jax.Array:
    return (x.q.astype(f32) * x.s[..., None]).astype(dtype)


class KVCache(NamedTuple):
    """One block's keys and values, [L, B, K, S, H] each; slot s holds position s. (In a
    per-layer Blocks cache: [B, K, S, H], or [K, S, H] for one row.)"""

    k: jax.Array
    v: jax.Array

    @property
    def length(self) -> int:
        return self.k.shape[-2]

    @property
    def rows(self) -> int:
        return 1 if self.k.ndim == 3 else self.k.shape[-4]

    @staticmethod
    def axes(ndim: int = 5) -> tuple[str, ...]:
        """Logical axes of an array of the cache with `ndim` dimensions."""
        return ("layers", "batch", "kv_heads", "length", "head_dim")[5 - ndim:]


class Blocks(NamedTuple):
    """A cache in row groups x position blocks: groups[g][j] is a KVCache [L, rows of group
    g, K, positions of block j, H]. Every group has the same blocks."""

    groups: tuple[tuple[KVCache, ...], ...]

    @property
    def length(self) -> int:
        return sum(b.length for b in self.groups[0])

    @property
    def rows(self) -> int:
        return sum(g[0].rows for g in self.groups)

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return tuple(b.length for b in self.groups[0])


def init_blocks(n_layers: int | None, groups: Sequence[int], blocks: Sequence[int],
                kv_heads: int, head_dim: int, dtype, quantization: str = "none") -> Blocks:
    """Zeros; n_layers=None: one layer's blocks, stored without size-1 dimensions.
    `quantization` int8 / fp8: 8-bit codes and float32 scales (QKV) instead of `dtype`."""
    def shape(g, s):
        if n_layers is None:
            return (g, kv_heads, s, head_dim) if g > 1 else (kv_heads, s, head_dim)
        return (n_layers, g, kv_heads, s, head_dim)

    def zeros(g, s):
        if check_kv_method(quantization) == "none":
            return jnp.zeros(shape(g, s), dtype)
        return QKV(jnp.zeros(shape(g, s), KV_QDTYPE[quantization]),
                   jnp.zeros(shape(g, s)[:-1], f32))
    return Blocks(tuple(tuple(KVCache(zeros(g, s), zeros(g, s)) for s in blocks)
                        for g in groups))


def map_arrays(fn, cache):
    """fn(array, its logical axes) over every array of a cache (any layout; 8-bit blocks'
    codes and scales, the scales without the head_dim axis)."""
    def one(x):
        if isinstance(x, QKV):
            axes = KVCache.axes(x.q.ndim)
            return QKV(fn(x.q, axes), fn(x.s, axes[:-1]))
        return fn(x, KVCache.axes(x.ndim))
    return jax.tree.map(one, cache, is_leaf=lambda x: isinstance(x, QKV))


def constrain(cache):
    """Sharding constraints on every array of a cache (any layout), by their logical axes."""
    return map_arrays(sharding.constrain, cache)


def _both(fn, c, *args):
    """fn over a block's keys or values: a plain array, or an 8-bit block's codes and scales
    (fn(array, *args, h): h = 1 where the array has the head_dim axis, 0 for scales)."""
    if isinstance(c, QKV):
        return QKV(fn(c.q, *args, 1), fn(c.s, *args, 0))
    return fn(c, *args, 1)


def _groups_for(blocks: Blocks, rows: int):
    """(group, first row, rows of it in use) for the groups holding rows 0..rows-1."""
    start = 0
    for group in blocks.groups:
        if start >= rows:
            return
        size = group[0].rows
        yield group, start, min(size, rows - start)
        start += size


def write(cache: Blocks, k: jax.Array, v: jax.Array, layer, positions: jax.Array) -> Blocks:
    """The cache with k, v [B, T, K, H] of rows 0..B-1 at (layer, b, :, positions[b, t]).

    Positions outside the cache (an idle row's, padding past the end) are dropped. Writes
    are in place; inside a layer scan too.
    """
    groups = list(cache.groups)
    for gi, (group, start, n) in enumerate(_groups_for(cache, k.shape[0])):
        kg, vg = k[start:start + n], v[start:start + n]
        pos = positions[start:start + n]
        new, off = [], 0
        for blk in group:
            new.append(KVCache(_write_to(_write_block, blk.k, kg, layer, pos - off),
                               _write_to(_write_block, blk.v, vg, layer, pos - off)))
            off += blk.length
        groups[gi] = tuple(new)
    return Blocks(tuple(groups))


def write_layers(cache: Blocks, k: jax.Array, v: jax.Array, positions: jax.Array) -> Blocks:
    """The stacked cache with every layer's k, v [L, B, T, K, H] (rows 0..B-1) written at
    positions [B, T], as `write` does one layer's: after a layer scan that only read it."""
    groups = list(cache.groups)
    for gi, (group, start, n) in enumerate(_groups_for(cache, k.shape[1])):
        # [n, T, L, K, H]: the order of c.at[:, row, :, idx]'s indexed dimensions
        kg = k[:, start:start + n].transpose(1, 2, 0, 3, 4)
        vg = v[:, start:start + n].transpose(1, 2, 0, 3, 4)
        pos = positions[start:start + n]
        new, off = [], 0
        for blk in group:
            new.append(KVCache(_write_to(_write_all, blk.k, kg, pos - off),
                               _write_to(_write_all, blk.v, vg, pos - off)))
            off += blk.length
        groups[gi] = tuple(new)
    return Blocks(tuple(groups))


def _write_to(write_fn, c, x, *args):
    """write_fn(c, x, *args, h) into a block's keys or values; into an 8-bit block, x
    quantized, its codes and scales."""
    if isinstance(c, QKV):
        xq = quantize_kv(x, c.q.dtype)
        return QKV(write_fn(c.q, xq.q, *args, 1), write_fn(c.s, xq.s, *args, 0))
    return write_fn(c, x, *args, 1)


def _write_all(c: jax.Array, x: jax.Array, idx: jax.Array, h: int = 1) -> jax.Array:
    """c [L, R, K, S, H] with x [n, T, L, K, H] at slots idx [n, T] of rows 0..n-1, every
    layer (dropped outside 0..S-1). h = 0: scales, without the H axes."""
    size = c.shape[c.ndim - 1 - h]
    idx = jnp.where((idx >= 0) & (idx < size), idx, size)
    row = jnp.arange(x.shape[0])[:, None]  # [n, 1]
    return c.at[:, row, :, idx].set(x.astype(c.dtype), mode="drop")


def _write_block(c: jax.Array, x: jax.Array, layer, idx: jax.Array, h: int = 1) -> jax.Array:
    """c with x [n, T, K, H] at slots idx [n, T] of rows 0..n-1 (dropped outside 0..S-1).
    h = 0: scales, c and x without their H axes."""
    rank = c.ndim + 1 - h  # the layout's: 5 stacked, 4 a layer's rows, 3 a layer's one row
    size = c.shape[c.ndim - 1 - h]
    inside = (idx >= 0) & (idx < size)
    x = x.astype(c.dtype)
    if rank == 3 and x.shape[1] == 1:
        # One row, one position (decode): a dynamic-update-slice of the slot the position
        # falls in, or of a slot with its own old value. (A one-row scatter becomes a
        # dynamic-update-slice, and its dropped out-of-bounds write a select over the whole
        # block: a copy of it on every step.)
        at = jnp.clip(idx[0, 0], 0, size - 1)
        start = (0, at) + (0,) * h
        old = jax.lax.dynamic_slice(c, start, (c.shape[0], 1) + c.shape[2:])
        return jax.lax.dynamic_update_slice(
            c, jnp.where(inside[0, 0], jnp.moveaxis(x[0], 0, 1), old), start)
    idx = jnp.where(inside, idx, size)  # elsewhere: dropped
    if rank == 3:  # one row, a chunk of positions: [K, T, H] at slots idx
        return c.at[:, idx[0]].set(jnp.moveaxis(x[0], 0, 1), mode="drop")
    row = jnp.arange(x.shape[0])[:, None]  # [n, 1]
    if rank == 4:
        return c.at[row, :, idx].set(x, mode="drop")
    return c.at[layer, row, :, idx].set(x, mode="drop")


def _rows_of(c: jax.Array, layer, n: int, h: int = 1) -> jax.Array:
    """[n, K, S, H]: rows 0..n-1 of the layer's block (sliced only if it holds more)."""
    rank = c.ndim + 1 - h
    if rank == 5:
        c = c[layer]
    elif rank == 3:
        c = c[None]
    return c if c.shape[0] == n else c[:n]


def _first(c: jax.Array, take: int, h: int = 1) -> jax.Array:
    """[n, K, take, H]: the first `take` positions of rows' blocks [n, K, S, H]."""
    return c[:, :, :take]


def _read_blocks(group, layer, n: int, attend: int):
    """Keys and values [n, K, S_j, H] of rows 0..n-1 of a row group's blocks over its first
    `attend` positions (whole blocks, but where `attend` ends inside one), and the positions
    of each block."""
    keys, values, key_pos, off = [], [], [], 0
    for blk in group:
        if off >= attend:
            break
        take = min(blk.length, attend - off)
        kb, vb = _both(_rows_of, blk.k, layer, n), _both(_rows_of, blk.v, layer, n)
        if take < blk.length:  # [n, K, S, H]
            kb, vb = _both(_first, kb, take), _both(_first, vb, take)
        keys.append(kb)
        values.append(vb)
        key_pos.append(off + jnp.arange(take))
        off += blk.length
    return keys, values, key_pos


def attention(q: jax.Array, cache: Blocks, layer, positions: jax.Array,
              attend: int | None = None, kernel: bool = False) -> jax.Array:
    """Attention of q [B, T, K, G, H] (rows 0..B-1 at `positions` [B, T]) over the cache, this
    step's keys/values written: query at position p sees slots s <= p. Only the cache's first
    `attend` positions (all if None) are read: whole blocks, but where `attend` ends inside
    one. `kernel`: one position per row (T = 1) through cpu_kernels.decode_attention where it takes
    the cache (each row reads its own positions only; a row past the cache's end is idle and
    gets zeros). Returns [B, T, K, G, H] in q.dtype.
    """
    if kernel and q.shape[1] == 1 and cpu_kernels.attention_supports(
            q, *zip(*[(b.k, b.v) for g in cache.groups for b in g])):
        return jnp.concatenate([
            cpu_kernels.decode_attention(q[start:start + n, 0], [b.k for b in group],
                                           [b.v for b in group], positions[start:start + n, 0])
            for group, start, n in _groups_for(cache, q.shape[0])], axis=0)[:, None]
    attend = cache.length if attend is None else attend
    outs = []
    for group, start, n in _groups_for(cache, q.shape[0]):
        keys, values, key_pos = _read_blocks(group, layer, n, attend)
        pos = positions[start:start + n]
        mask = jnp.concatenate(key_pos)[None, None, :] <= pos[:, :, None]  # [n, T, S]
        outs.append(attend_over(q[start:start + n], keys, values, mask))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)


def attention_before(q: jax.Array, cache: Blocks, layer, k: jax.Array, v: jax.Array,
                     positions: jax.Array, attend: int | None = None) -> jax.Array:
    """Attention of q [B, T, K, G, H] over the cache's slots before each row's first position
    (positions[:, 0]) and over this step's own keys/values k, v [B, T, K, H] (causally), the
    cache only read: the keys/values are written after the layers (`write_layers`). Equal to
    `write` then `attention` where a row's positions are consecutive, as every step's are.
    """
    attend = cache.length if attend is None else attend
    outs = []
    for group, start, n in _groups_for(cache, q.shape[0]):
        keys, values, key_pos = _read_blocks(group, layer, n, attend)
        pos = positions[start:start + n]  # [n, T]
        old = jnp.concatenate(key_pos)[None, None, :] < pos[:, :1, None]  # [n, 1, S]
        own = pos[:, None, :] <= pos[:, :, None]  # [n, T, T]
        mask = jnp.concatenate([jnp.broadcast_to(old, (n, pos.shape[1], old.shape[-1])), own],
                               axis=-1)
        kn, vn = k[start:start + n], v[start:start + n]
        if isinstance(group[0].k, QKV):  # as `write` then `attention` would read them
            kn = dequantize_kv(quantize_kv(kn, group[0].k.dtype), kn.dtype)
            vn = dequantize_kv(quantize_kv(vn, group[0].v.dtype), vn.dtype)
        keys.append(kn.transpose(0, 2, 1, 3))  # [n, K, T, H]
        values.append(vn.transpose(0, 2, 1, 3))
        outs.append(attend_over(q[start:start + n], keys, values, mask))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)


def attend_over(q: jax.Array, keys: Sequence[jax.Array], values: Sequence[jax.Array],
                mask: jax.Array) -> jax.Array:
    """Softmax attention of q [B, T, K, G, H] over keys/values given as blocks [B, K, S_j, H]
    (their positions in order; arrays, or 8-bit QKV blocks), where mask [B, T, S] (S = the
    blocks' total) is True. Scores and softmax in float32; returns [B, T, K, G, H] in
    q.dtype."""
    H = q.shape[-1]
    scores = jnp.concatenate([_scores(q, kb) for kb in keys], axis=-1) * (H ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(f32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if len(values) == 1 and not isinstance(values[0], QKV):
        return jnp.einsum("BKGTS,BKSH->BTKGH", probs.astype(q.dtype),
                          values[0].astype(q.dtype))
    out, off = 0.0, 0
    for vb in values:  # per block, summed in float32
        s = vb.shape[2]
        p = probs[..., off:off + s]
        if isinstance(vb, QKV):  # the values' scales fold into the probabilities
            p, vb = p * vb.s[:, :, None, None, :], vb.q
        out = out + jnp.einsum("BKGTS,BKSH->BTKGH", p.astype(q.dtype), vb.astype(q.dtype),
                               preferred_element_type=f32)
        off += s
    return out.astype(q.dtype)


def _scores(q: jax.Array, kb) -> jax.Array:
    """[B, K, G, T, S] float32 q . k of a block (an 8-bit one's codes, times their scales)."""
    if isinstance(kb, QKV):
        raw = jnp.einsum("BTKGH,BKSH->BKGTS", q, kb.q.astype(q.dtype),
                         preferred_element_type=f32)
        return raw * kb.s[:, :, None, None, :]
    return jnp.einsum("BTKGH,BKSH->BKGTS", q, kb.astype(q.dtype), preferred_element_type=f32)


def copy_row(cache: Blocks, stage: Blocks, slot, blocks: int) -> Blocks:
    """`cache` with the first `blocks` position blocks of the one-row `stage` in row `slot`
    (written into each row group, dropped where the slot is not)."""
    groups, start = [], 0
    for group in cache.groups:
        size = group[0].rows
        inside = (slot >= start) & (slot < start + size)
        row = jnp.where(inside, slot - start, size)

        def put(c, src, h, row=row, inside=inside):  # src: the staging row, [L, 1, K, S, H]
            # or [K, S, H]; h = 0: scales, without H
            rank = c.ndim + 1 - h
            if rank == 5:
                return c.at[:, row].set(src[:, 0], mode="drop")
            if rank == 4:
                return c.at[row].set(src, mode="drop")
            return jnp.where(inside, src, c)  # a one-row group

        def put_both(c, src):  # as _write_to: an 8-bit block's codes and scales
            if isinstance(c, QKV):
                return QKV(put(c.q, src.q, 1), put(c.s, src.s, 0))
            return put(c, src, 1)

        groups.append(tuple(
            KVCache(put_both(blk.k, src.k), put_both(blk.v, src.v)) if j < blocks else blk
            for j, (blk, src) in enumerate(zip(group, stage.groups[0]))))
        start += size
    return Blocks(tuple(groups))


def take_row(cache: Blocks, slot, n: int) -> Blocks:
    """The first n position blocks of row `slot`, as a one-row Blocks (a branch per row
    group, the slot traced)."""
    sizes = [g[0].rows for g in cache.groups]
    starts = [0, *itertools.accumulate(sizes)][:-1]
    group = sum((slot >= s).astype(jnp.int32) for s in starts[1:])

    def branch(g):
        def take(c: Blocks) -> Blocks:
            row = slot - starts[g]

            def one(a, h):  # the row, in the staging row's shape (h = 0: scales)
                rank = a.ndim + 1 - h
                if rank == 5:
                    return jax.lax.dynamic_slice_in_dim(a, row, 1, axis=1)
                if rank == 4:
                    return jax.lax.dynamic_index_in_dim(a, row, 0, keepdims=False)
                return jnp.copy(a)
            return Blocks((tuple(KVCache(_both(one, blk.k), _both(one, blk.v))
                                 for blk in c.groups[g][:n]),))
        return take

    return jax.lax.switch(group, [branch(g) for g in range(len(sizes))], cache)
