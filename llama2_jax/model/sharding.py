"""The only module that knows mesh axis names.

Arrays are annotated with *logical* axis names (`embed`, `heads`, ...); `RULES` maps each to the
mesh axes it is split over. A dimension whose size the mesh axes do not divide is replicated
instead (see `logical_to_spec`), except query heads, which must divide evenly (an error).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

# One table: logical axis -> mesh axes. Weights are split over `fsdp` along their embedding
# dimension and over `tensor` along heads / FFN width / vocabulary (Megatron-style); the
# batch of activations and of the KV cache is split over `data` and `fsdp`.
RULES: dict[str, tuple[str, ...]] = {
    "batch": (DATA, FSDP),
    "length": (),
    "embed": (FSDP,),
    "heads": (TENSOR,),
    "kv_heads": (TENSOR,),
    "head_dim": (),
    "mlp": (TENSOR,),
    "vocab": (TENSOR,),
    "layers": (),
}


class ShardingError(ValueError):
    """A mesh that cannot hold the model as asked."""


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all).

    One size may be -1: the devices left. Sizes whose product is smaller than the device
    count use the first devices only (e.g. tensor=2 on a machine with 8).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ShardingError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}, "
                            f"tensor={tensor}")
    for name, size in zip(MESH_AXES, sizes):
        if size != -1 and (not isinstance(size, int) or size < 1):
            raise ShardingError(f"mesh axis {name} must be a positive integer or -1, got {size!r}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ShardingError(f"{len(devices)} devices cannot be split into data={data}, "
                                f"fsdp={fsdp}, tensor={tensor}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        if math.prod(sizes) > len(devices):
            raise ShardingError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} "
                                f"needs {math.prod(sizes)} devices, {len(devices)} present")
        devices = devices[:math.prod(sizes)]
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def check_mesh(mesh: Mesh, n_heads: int, n_kv_heads: int) -> None:
    """Raise if tensor parallelism cannot split the attention heads.

    Query heads must divide by the tensor axis. KV heads that do not (70B has 8) are
    replicated over it: correct, at the cost of the KV projection's memory.
    """
    tp = mesh.shape.get(TENSOR, 1)
    if n_heads % tp:
        raise ShardingError(f"tensor-parallel size {tp} does not divide n_heads={n_heads}; "
                            f"choose a tensor size that divides {n_heads}")
    del n_kv_heads  # replicated when not divisible, see logical_to_spec


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
    """PartitionSpec for logical `axes`; with `shape` and `mesh`, indivisible dims replicate."""
    out = []
    used: set[str] = set()
    for i, name in enumerate(axes):
        mesh_axes = tuple(a for a in RULES[name] if a not in used) if name else ()
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape.get(a, 1) > 1)
            if shape is not None and mesh_axes:
                # Keep the longest prefix of mesh axes whose product divides the dimension.
                while mesh_axes and shape[i] % math.prod(mesh.shape[a] for a in mesh_axes):
                    mesh_axes = mesh_axes[:-1]
        used.update(mesh_axes)
        out.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return P(*out)


def named_sharding(mesh: Mesh, axes: Sequence[str | None],
                   shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation, under the mesh set by `jax.set_mesh` (if any)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(axes, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def is_main_process() -> bool:
    return jax.process_index() == 0
