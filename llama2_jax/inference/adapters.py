"""LoRA adapters served per row: several adapters stacked on the devices beside one base, each
row of a step gathering its own (S-LoRA / Punica's batched LoRA, in two plain matmuls).

A stack holds up to `max_adapters` adapters of rank <= `max_rank` on a fixed set of target
weights. For each target it keeps a [L, in, M*R] and b [L, M*R, out] (M = max_adapters,
R = max_rank): adapter k (1-based) owns columns (k-1)*R .. k*R of a and those rows of b, its
rank padded with zeros and its scale (alpha / rank) folded into b. In a step, row i's adapter
index picks its columns with a 0/1 mask `select` [B, M*R] (index 0, the base, picks none):

  y = x @ W + ((x @ a) * select) @ b

so every row pays for the M*R columns whatever it uses, rows of different adapters and of the
base share one compiled step, and loading an adapter writes into the stack without a
recompile (its shapes never change). The cost over the base is (in + out) * M * R per target
and layer: set the limits to what is served.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llama2_jax.model import adapter as adapter_format
from llama2_jax.model import sharding
from llama2_jax.model.adapter import TARGETS, AdapterError, OverBase
from llama2_jax.model.transformer import linear


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowLoRA(OverBase):
    """A base weight plus each row's own low-rank update, as `model.linear` takes it.

    `base` has the weight's shape (the model reshapes it to its [in, out] view); a [in, M*R],
    b [M*R, out] and select [B, M*R] (a leading L axis on all four when stacked).
    """

    base: jax.Array
    a: jax.Array
    b: jax.Array
    select: jax.Array

    def einsum(self, eq: str, x: jax.Array, out_dtype=None) -> jax.Array:
        y = linear(eq, x, self.base, out_dtype)  # the base may be 8-bit
        xa = jnp.einsum("BTI,IR->BTR", x, self.a.astype(x.dtype))  # [B, T, M*R]
        xa = xa * self.select[:, None, :].astype(x.dtype)
        return y + jnp.einsum("BTR,RO->BTO", xa, self.b.astype(x.dtype)).astype(y.dtype)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a stack holds: up to `max_adapters` adapters of rank <= `max_rank` on `targets`."""

    max_adapters: int
    max_rank: int
    targets: tuple[str, ...]

    def __post_init__(self):
        if self.max_adapters < 1 or self.max_rank < 1:
            raise ValueError(f"an adapter stack needs max_adapters >= 1 and max_rank >= 1, got "
                             f"{self.max_adapters} and {self.max_rank}")
        odd = [t for t in self.targets if t not in TARGETS]
        if odd or not self.targets:
            raise ValueError(f"adapter targets {list(self.targets)}: expected some of "
                             f"{', '.join(TARGETS)}")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))

    @property
    def columns(self) -> int:
        return self.max_adapters * self.max_rank

    def check(self, meta: dict, directory) -> None:
        """AdapterError unless the adapter of `meta` (its metadata file) fits these limits."""
        if meta["rank"] > self.max_rank:
            raise AdapterError(f"{directory}: rank {meta['rank']} is over the server's "
                               f"max_lora_rank {self.max_rank}")
        extra = [t for t in meta["targets"] if t not in self.targets]
        if extra:
            raise AdapterError(f"{directory}: adapts {', '.join(extra)}, outside the server's "
                               f"lora_targets ({', '.join(self.targets)})")


def limits_for(directories, max_adapters: int = 0, max_rank: int = 0,
               targets: tuple[str, ...] = ()) -> Limits:
    """Limits that fit the adapters in `directories`: each limit left 0 / empty becomes what
    they need (their count, their highest rank, their targets), or, with none given, 1 slot,
    rank 16 and every target."""
    metas = [adapter_format.read_meta(d) for d in directories]
    limits = Limits(max_adapters or max(len(metas), 1),
                    max_rank or max((m["rank"] for m in metas), default=16),
                    tuple(targets) or tuple({t for m in metas for t in m["targets"]})
                    or tuple(TARGETS))
    for meta, directory in zip(metas, directories):
        limits.check(meta, directory)
    return limits


class AdapterStack:
    """The stacked adapters of a model's Weights (see the module docstring): `arrays` is what
    a step takes, `bind` puts them in the model inside it, `put` writes one adapter."""

    def __init__(self, weights, limits: Limits, abstract: bool = False):
        if weights.fused:  # `bind` wraps a layer's separate q/k/v and w1/w3
            raise ValueError("LoRA adapters bind to separate q/k/v and w1/w3 matrices: "
                             "build the Weights with fuse=False")
        self.limits, self.config = limits, weights.config
        self.replicated = NamedSharding(weights.mesh, PartitionSpec())
        dtype = weights.config.compute_dtype
        # Per-layer arrays when the layers run one by one (a slice of a stacked array is a
        # copy on XLA:CPU), else stacked [L, ...] for the scan.
        self.per_layer = weights.per_layer

        def struct(shape):
            one = jax.ShapeDtypeStruct(shape[1:], dtype, sharding=self.replicated)
            return (tuple(one for _ in range(shape[0])) if self.per_layer
                    else jax.ShapeDtypeStruct(shape, dtype, sharding=self.replicated))
        shapes = {t: tuple(struct(s) for s in ab)
                  for t, ab in self._shapes(limits.columns).items()}
        self.arrays = shapes if abstract else jax.tree.map(
            lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding), shapes)
        self.mesh, self.traces = weights.mesh, 0
        self.loaded: set[int] = set()  # stack indices holding an adapter
        self._put = jax.jit(self._put_fn, donate_argnames=("arrays",))

    def _shapes(self, rank: int) -> dict:
        return adapter_format.shapes(self.config, self.limits.targets, rank)

    # -- inside the jitted steps -------------------------------------------------------------
    def select(self, index: jax.Array) -> jax.Array:
        """[B, M*R] 0/1: the columns of each row's adapter (index [B]; 0 = the base)."""
        owner = jnp.arange(self.limits.columns) // self.limits.max_rank + 1  # [M*R]
        return (index[:, None] == owner[None, :]).astype(self.config.compute_dtype)

    def bind(self, model, unstacked, arrays: dict, select: jax.Array):
        """(model, unstacked) as `Weights.model` gives them, with every target weight a
        RowLoRA over `arrays` (the stack) and `select` [B, M*R]."""
        graphdef, state = nnx.split(model)
        n_layers = self.config.n_layers

        def adapt(layers: dict, layer: int | None) -> dict:
            for t, (a, b) in arrays.items():
                module = TARGETS[t][0]
                base = layers[module][t]
                if layer is None:  # stacked layers: every leaf is scanned over L
                    sel = jnp.broadcast_to(select, (n_layers, *select.shape))
                    layers[module][t] = RowLoRA(base, a, b, sel)
                else:
                    layers[module][t] = RowLoRA(base, a[layer], b[layer], select)
            return layers

        if unstacked is None:
            pure = nnx.to_pure_dict(state)
            pure["layers"] = adapt(pure["layers"], None)
            state = jax.tree.map(lambda x: x, state)
            nnx.replace_by_pure_dict(state, pure)
            return nnx.merge(graphdef, state), None
        out = []
        for i, layer_state in enumerate(unstacked):
            layer_state = jax.tree.map(lambda x: x, layer_state)
            nnx.replace_by_pure_dict(layer_state, adapt(nnx.to_pure_dict(layer_state), i))
            out.append(layer_state)
        return model, tuple(out)

    def _put_fn(self, arrays: dict, columns: dict, start) -> dict:
        """`arrays` with one adapter's (a [L, in, R], b [L, R, out]) at column `start`."""
        self.traces += 1
        def put(old, new, at):
            if isinstance(old, tuple):  # per layer
                return tuple(jax.lax.dynamic_update_slice(o, new[i].astype(o.dtype), at[1:])
                             for i, o in enumerate(old))
            return jax.lax.dynamic_update_slice(old, new.astype(old.dtype), at)
        return {t: (put(a, columns[t][0], (0, 0, start)), put(b, columns[t][1], (0, start, 0)))
                for t, (a, b) in arrays.items()}

    # -- on the host -------------------------------------------------------------------------
    def zeros(self) -> dict:
        """An empty adapter's columns (what a warm-up writes)."""
        return {t: tuple(np.zeros(s, np.float32) for s in ab)
                for t, ab in self._shapes(self.limits.max_rank).items()}

    def read(self, directory: str | os.PathLike) -> dict:
        """The columns of the adapter in `directory` (numpy, rank padded, scale folded into
        b), checked against the served model and these limits: AdapterError names what does
        not fit."""
        self.limits.check(adapter_format.read_meta(directory), directory)
        local = sharding.make_mesh(devices=jax.local_devices()[:1])
        loaded = adapter_format.load(directory, mesh=local)
        adapter_format.check_fits(loaded, self.config, where=str(directory))
        out = self.zeros()
        r = loaded.rank
        for t in loaded.targets:
            ab = loaded.params["layers"][TARGETS[t][0]][t]
            out[t][0][:, :, :r] = np.asarray(ab["a"], np.float32)
            out[t][1][:, :r, :] = loaded.scale * np.asarray(ab["b"], np.float32)
        return out

    def place(self, columns: dict) -> dict:
        """Host columns on the devices, replicated as the stack is."""
        return jax.device_put(columns, self.replicated)

    def write(self, index: int, columns: dict) -> None:
        """Stack index `index` (1..max_adapters) holds `columns` (host arrays, as `read`)."""
        if not 1 <= index <= self.limits.max_adapters:
            raise ValueError(f"adapter index {index} out of range 1..{self.limits.max_adapters}")
        with jax.set_mesh(self.mesh):
            self.arrays = self._put(self.arrays, self.place(columns),
                                    np.int32((index - 1) * self.limits.max_rank))

    def load(self, index: int, directory: str | os.PathLike) -> None:
        """The adapter in `directory` at stack index `index`, replacing what was there."""
        self.write(index, self.read(directory))
        self.loaded.add(index)

    def warm_up(self) -> None:
        """Compile `write` (an empty adapter into a free index), so loading compiles nothing."""
        free = sorted(set(range(1, self.limits.max_adapters + 1)) - self.loaded)
        if free:
            self.write(free[0], self.zeros())
