"""A layer's q/k/v projections, and its MLP's gate and up projections, as one matrix each.

On CPU, steps run the layers from per-layer copies of their weights (`Weights(unstack=...)`,
`Transformer(unstacked=...)`). `fuse_layer` stores such a copy's wq | wk | wv as one
[D, (N + 2K) * H] matrix and w1 | w3 as one [D, 2F]: a step then runs one matmul where it ran
three (two). XLA:CPU runs a one-row step ~8-12% faster that way and a 16-row step no faster
(3-5% slower; benchmarks/RESULTS.md, issue 19), so the Engine (generate, the chat app: one row
at a time) fuses and the server does not. The stacked weights, checkpoints, sharding and
training keep Meta's separate matrices; only float arrays on one device are fused (an 8-bit
or 4-bit weight, a sharded array keeps its own matmuls), and LoRA adapters need the separate
ones.

In the fused copy, `wq` holds a `FusedQKV` and `w1` a `FusedGateUp`; `wk`, `wv` and `w3` hold
`Absent` (no array). `Attention` and `FeedForward` split the fused product.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


class Whole:
    """A parameter's value that is read whole: `param[...]` gives it back."""

    def __getitem__(self, index):
        if index is not Ellipsis:
            raise TypeError(f"{type(self).__name__} is read whole (param[...]), got {index!r}")
        return self


@dataclasses.dataclass(frozen=True)
class FusedQKV(Whole):
    """wq | wk | wv of one layer as w [D, (N + 2K) * H]; `shape` is wq's [D, N, H]."""

    w: jax.Array
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.w.shape[0], self.heads, self.head_dim)


@dataclasses.dataclass(frozen=True)
class FusedGateUp(Whole):
    """w1 | w3 of one layer as w [D, 2F]; `shape` is w1's [D, F]."""

    w: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.w.shape[0], self.w.shape[1] // 2)


@dataclasses.dataclass(frozen=True)
class Absent(Whole):
    """Where a fused matrix's other parts were (wk, wv, w3): no array."""


jax.tree_util.register_dataclass(FusedQKV, data_fields=("w",),
                                 meta_fields=("heads", "kv_heads", "head_dim"))
jax.tree_util.register_dataclass(FusedGateUp, data_fields=("w",), meta_fields=())
jax.tree_util.register_dataclass(Absent, data_fields=(), meta_fields=())


def fusable(state: nnx.State) -> bool:
    """Whether a layer's copy can be fused: its q/k/v and w1/w3 plain float arrays (or
    abstract ones) on one device."""
    pure = nnx.to_pure_dict(state)
    names = [pure["attention"][n] for n in ("wq", "wk", "wv")]
    names += [pure["feed_forward"][n] for n in ("w1", "w3")]

    def plain(a) -> bool:
        if not isinstance(a, (jax.Array, jax.ShapeDtypeStruct)):
            return False  # a quantized weight, an adapter's wrapper
        one_device = a.sharding is None or len(a.sharding.device_set) == 1
        return jnp.issubdtype(a.dtype, jnp.floating) and one_device

    return all(plain(a) for a in names)


def _flat(a, d: int):
    """a [D, ...] as [D, rest] (an abstract array's shape alike)."""
    if isinstance(a, jax.ShapeDtypeStruct):  # on one device: its mesh, nothing split
        s = a.sharding
        if isinstance(s, jax.sharding.NamedSharding):
            s = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
        return jax.ShapeDtypeStruct((d, a.size // d), a.dtype, sharding=s)
    return a.reshape(d, -1)


def _concat(parts):
    if isinstance(parts[0], jax.ShapeDtypeStruct):
        shape = (*parts[0].shape[:-1], sum(p.shape[-1] for p in parts))
        return jax.ShapeDtypeStruct(shape, parts[0].dtype, sharding=parts[0].sharding)
    return jnp.concatenate(parts, axis=-1)


def fuse_layer(state: nnx.State) -> nnx.State:
    """A layer's weight state with q/k/v and w1/w3 fused (the arrays copied; `state` kept)."""
    state = jax.tree.map(lambda x: x, state)
    pure = nnx.to_pure_dict(state)
    att, ff = pure["attention"], pure["feed_forward"]
    d, n, h = att["wq"].shape
    k = att["wk"].shape[1]
    att["wq"] = FusedQKV(_concat([_flat(att[t], d) for t in ("wq", "wk", "wv")]), n, k, h)
    att["wk"] = att["wv"] = Absent()
    ff["w1"] = FusedGateUp(_concat([ff["w1"], ff["w3"]]))
    ff["w3"] = Absent()
    nnx.replace_by_pure_dict(state, pure)
    return state
