"""A model's weights as the device steps take them: split from the Flax module once, flattened
(jit flattens a tuple of arrays in C++; an nnx.State costs ~1.5 ms of Python per call), and on
CPU with a per-layer copy of the layer weights.

Why the copy: XLA:CPU copies every scanned layer's weights out of the stack before its
matmuls, so on CPU the layers run from per-layer arrays in an unrolled loop (~1.5x faster
decode, for a second copy of the layers). Accelerators scan the stacked layers: XLA:GPU/TPU
read a scanned layer's slice in place (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from llama2_jax.model import cpu_kernels, fused, packed, sharding
from llama2_jax.model.transformer import Transformer, unstack_layers


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """Tuning values of the weights' layout.

    unstack_max_bytes: on CPU, models whose layers take at most this run from a per-layer copy
    of the layer weights (`Weights(unstack=None)`).
    cpu_compiler_options: XLA options of the steps compiled for CPU devices (`Weights.
    compiler_options`). XLA:CPU hands dots and the reductions and elementwise work around them
    to YNNPACK fusions by default; at decode and prefill shapes its own dot emitters are faster,
    with YNNPACK kept for reductions (benchmarks/RESULTS.md, "Where a decode step's time goes").
    cpu_kernels: decode attention, the sampler's top-p floor and the weight matmuls (over
      packed weights, llama2_jax.model.packed) through the kernels of
      llama2_jax.model.cpu_kernels where they can run (`Weights.cpu_kernels`).
    """

    unstack_max_bytes: int = 2 << 30
    cpu_compiler_options: tuple[tuple[str, str], ...] = (
        ("xla_cpu_experimental_ynn_fusion_type", "LIBRARY_FUSION_TYPE_REDUCE"),)
    cpu_kernels: bool = True


DEFAULT_OPTIONS = EngineOptions()


def model_mesh(model: Transformer) -> Mesh:
    """The mesh the model's parameters live on (a 1-device mesh if they are not sharded)."""
    leaf = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
    if isinstance(leaf.sharding, NamedSharding):
        return leaf.sharding.mesh
    return sharding.make_mesh(devices=sorted(leaf.devices(), key=lambda d: d.id))


def unstack_default(model: Transformer, options: EngineOptions = DEFAULT_OPTIONS,
                    platform: str | None = None) -> bool:
    """Whether the layers run from per-layer copies by default: on CPU (`platform`, None: the
    default backend), small enough layers."""
    layer_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model.layers)))
    platform = platform or jax.default_backend()
    return platform == "cpu" and layer_bytes <= options.unstack_max_bytes


class Weights:
    """The model's parameters for jitted steps: `leaves` is what a step takes, `model(leaves)`
    rebuilds (the module, the per-layer states or None) inside it.

    Args:
      model: the Transformer (its parameters placed on `mesh`).
      mesh: where they live (None: the mesh of the parameters).
      unstack: run the layers from per-layer copies (None: `unstack_default`).
      fuse: on CPU, keep the per-layer copies' q/k/v and w1/w3 as one matrix each
        (`llama2_jax.model.fused`: faster at one row, not at 16; float weights on one device
        only, `fused` says whether they were). Not with LoRA adapters.
    """

    def __init__(self, model: Transformer, mesh: Mesh | None = None, unstack: bool | None = None,
                 options: EngineOptions = DEFAULT_OPTIONS, fuse: bool = False):
        self.config = model.config
        self.mesh = mesh or model_mesh(model)
        self.options = options
        self.graphdef, self.state = nnx.split(model)
        if unstack is None:
            unstack = unstack_default(model, options, self.platform)
        self.unstacked = unstack_layers(model) if unstack else None
        self.fused = bool(fuse and self.unstacked and self.platform == "cpu"
                          and all(fused.fusable(s) for s in self.unstacked))
        if self.fused:
            self.unstacked = tuple(fused.fuse_layer(s) for s in self.unstacked)
        # The kernels' matmuls read their weights packed in tiles: the per-layer copies (a
        # copy already) and the output matrix are stored so, in place of the plain arrays.
        self.packed = self.cpu_kernels
        if self.packed:
            self.unstacked = tuple(packed.pack_layer(s) for s in self.unstacked)
            self.state = packed.pack_output(self.state)
        leaves, self._treedef = jax.tree.flatten((self.state, self.unstacked))
        self.leaves = tuple(leaves)

    @property
    def platform(self) -> str:
        """The platform of the mesh's devices ("cpu", "gpu", "tpu"): which layouts steps use."""
        return self.mesh.devices.flat[0].platform

    @property
    def compiler_options(self) -> dict[str, str] | None:
        """XLA options for the steps over these weights (`jax.jit(compiler_options=...)`)."""
        return dict(self.options.cpu_compiler_options) if self.platform == "cpu" else None

    @property
    def cpu_kernels(self) -> bool:
        """Whether steps use llama2_jax.model.cpu_kernels (decode attention over per-layer
        caches, the sampler's floor, matmuls over packed weights): on one CPU device, with
        the option on and the kernels built (compiled on the first call in a process)."""
        return bool(self.per_layer and self.platform == "cpu" and self.mesh.devices.size == 1
                    and self.options.cpu_kernels and cpu_kernels.available())

    @property
    def per_layer(self) -> bool:
        """Whether steps run the layers one by one (and keep one KV cache per layer)."""
        return self.unstacked is not None

    def model(self, leaves) -> tuple[Transformer, tuple | None]:
        """(the module, the per-layer states or None) from `leaves`, inside a jitted step."""
        state, unstacked = jax.tree.unflatten(self._treedef, leaves)
        return nnx.merge(self.graphdef, state), unstacked
