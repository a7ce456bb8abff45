"""Weights packed in column tiles for the CPU matmul kernel (cpu_matmul.cc).

A weight W viewed as [K, N] (its input axes, then its output axes) is stored as
w [N / TILE, K, TILE]: each tile of TILE output columns is one contiguous run, which the
kernel reads front to back once per step and reuses for every row from the cache. XLA:CPU's
own dots read a [K, N] weight in strided panels; over packed tiles a decode step's weight
matmuls ran 1.14-1.17x faster at one row, 1.47-1.59x at 16 rows and 1.2-1.5x at prefill's
64-256 rows (benchmarks/matmul_chain.py; benchmarks/RESULTS.md, "Fifth look").

Where: `Weights` packs its per-layer copies and the output matrix when the steps run on one
CPU device with the kernels available (`Weights.packed`); nothing else changes. A packed weight
is a `Weight` (llama2_jax.model.transformer.linear): it answers `shape`, `dtype`, `w[...]` and
`reshape` as the array it stands for, and multiplies through the kernel. Float32 and bfloat16
arrays only (8-bit and 4-bit weights keep their own matmuls); N is padded with zero columns to
a multiple of TILE. Not differentiable: inference only.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from llama2_jax.model import cpu_kernels, fused

TILE = 32  # columns per tile: cpu_matmul.cc's kTile
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# input axes of a layer's weights as stored (the rest are outputs): wo is [N, H, D]
IN_AXES = {"wo": 2}


@dataclasses.dataclass(frozen=True)
class Packed(fused.Whole):
    """A weight of logical `shape` (its first `n_in` axes the inputs), packed as
    w [ceil(N / TILE), K, TILE]."""

    w: jax.Array
    shape: tuple[int, ...]
    n_in: int

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def k(self) -> int:
        return math.prod(self.shape[:self.n_in])

    @property
    def n(self) -> int:
        return math.prod(self.shape[self.n_in:])

    def reshape(self, *shape) -> "Packed":
        """The same weight viewed as `shape`, whose leading axes still hold the K inputs."""
        shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        for n_in in range(1, len(shape)):
            if math.prod(shape[:n_in]) == self.k and math.prod(shape[n_in:]) == self.n:
                return Packed(self.w, shape, n_in)
        raise ValueError(f"cannot view a packed weight of shape {self.shape} ({self.k} inputs, "
                         f"{self.n} outputs) as {shape}")

    def einsum(self, eq: str, x: jax.Array, out_dtype=None) -> jax.Array:
        """`jnp.einsum(eq, x, W)` where eq contracts x's last axis with W's inputs, e.g.
        "BTD,DQ->BTQ" or "...D,DV->...V" (the only kind the model uses)."""
        lhs, rest = eq.replace(" ", "").split(",")
        rhs, out = rest.split("->")
        n_in = len(rhs) - (len(self.shape) - self.n_in)
        if (not lhs or n_in != 1 or rhs[0] != lhs[-1] or out != lhs[:-1] + rhs[1:]
                or x.shape[-1] != self.k):
            raise ValueError(f"a packed weight {self.shape} multiplies x [..., {self.k}] on its "
                             f"last axis; got {eq!r} with x {x.shape}")
        y = cpu_kernels.matmul(x.reshape(-1, self.k), self.w)
        if y.shape[-1] != self.n:
            y = y[:, :self.n]
        return y.reshape(*x.shape[:-1], *self.shape[self.n_in:]).astype(out_dtype or x.dtype)


jax.tree_util.register_dataclass(Packed, data_fields=("w",), meta_fields=("shape", "n_in"))


def packable(a) -> bool:
    """A plain float32 / bfloat16 array (or abstract one) on one device."""
    if not isinstance(a, (jax.Array, jax.ShapeDtypeStruct)) or a.ndim < 2:
        return False
    one_device = a.sharding is None or len(a.sharding.device_set) == 1
    return a.dtype in DTYPES and one_device


def pack(a, n_in: int = 1) -> Packed:
    """`a` (its first n_in axes the inputs) packed in tiles; an abstract array alike."""
    k, n = math.prod(a.shape[:n_in]), math.prod(a.shape[n_in:])
    tiles = -(-n // TILE)
    if isinstance(a, jax.ShapeDtypeStruct):
        return Packed(jax.ShapeDtypeStruct((tiles, k, TILE), a.dtype, sharding=a.sharding),
                      tuple(a.shape), n_in)
    w = a.reshape(k, n)
    if tiles * TILE != n:
        w = jnp.pad(w, ((0, 0), (0, tiles * TILE - n)))
    return Packed(w.reshape(k, tiles, TILE).transpose(1, 0, 2), tuple(a.shape), n_in)


def _pack_leaf(name: str, a):
    if isinstance(a, (fused.FusedQKV, fused.FusedGateUp)):
        return dataclasses.replace(a, w=_pack_leaf(name, a.w))
    return pack(a, IN_AXES.get(name, 1)) if packable(a) else a


def pack_layer(state: nnx.State) -> nnx.State:
    """A per-layer weight state (fused or not) with its float matrices packed (a copy)."""
    state = jax.tree.map(lambda x: x, state)
    pure = nnx.to_pure_dict(state)
    for module in ("attention", "feed_forward"):
        for name, a in pure[module].items():
            pure[module][name] = _pack_leaf(name, a)
    nnx.replace_by_pure_dict(state, pure)
    return state


def pack_output(state: nnx.State) -> nnx.State:
    """The model's state with its output matrix [D, V] packed (a copy)."""
    state = jax.tree.map(lambda x: x, state)
    pure = nnx.to_pure_dict(state)
    if packable(pure["output"]):
        pure["output"] = pack(pure["output"])
    nnx.replace_by_pure_dict(state, pure)
    return state
