"""Weight-only quantization: int8 and FP8 (e4m3) with one scale per output channel, int4 with
one scale per group of 128 inputs and output channel.

A quantized weight is a `QArray`: `q` holds the weight in 8 or 4 bits, `scale` float32 scales,
and w ~ q * scale (symmetric absmax: the largest |w| of a channel, or of a group, maps to 127
for int8, to 448, e4m3's largest finite value, for FP8, to 7 for int4). It is a pytree (`q` and
`scale` are its leaves), so it sits inside an `nnx.Param`, is sharded, sliced by the layer scan
and saved like an array; model.py's `linear()` calls its `einsum`. 8-bit weights multiply by q
and then by the scale (a per-column factor of the product); int4 weights are two codes per
byte, multiplied as llama2_jax.model.int4 says. Layout: `q` [lead..., in..., out...] (int4:
the last input axis split into [groups, group / 2]); `scale` [lead..., out...] (8-bit) or
[lead..., in..., out...] with the last input axis divided by the group size (int4), where
`lead` is the stacked-layer axis L (none for `output`). A QArray's `shape` is the weight's.

Embeddings (a gather; loaded beside quantized weights in their checkpoint's 16 bits) and
norms are not quantized. Weights are converted to the compute dtype inside the jitted step (on
CPU a chunk at a time: cpu_matmul). FP8 weights quantized with `native=True` (`quantize_model(
..., native_fp8=True)`, the `native_fp8` setting) multiply activations cast to e4m3 too (one
scale per row), so the dot can run on FP8 hardware (Hopper's FP8 GEMMs). Off by default: on a
trained tiny model it more than doubles the KL divergence from the unquantized model (weight-
only FP8 matches plain absmax quantization; RESULTS.md). Tested on CPU, not run on a GPU.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama2_jax.model import cpu_matmul, int4, sharding
from llama2_jax.model.config import ConfigError

f32 = jnp.float32
METHODS = ("none", "int8", "fp8", "int4")
QDTYPE = {"int8": jnp.dtype(jnp.int8), "fp8": jnp.dtype(jnp.float8_e4m3fn),
          "int4": jnp.dtype(jnp.uint8)}  # int4: two codes per byte
QMAX = {"int8": 127.0, "fp8": 448.0}
BITS = {"int8": 8, "fp8": 8, "int4": 4}  # per weight value
# Quantized parameters, by their last name, and how many of their axes (after the stacked L
# axis) are the matmul's inputs: model.py's layouts (wq [D, N, H], wo [N, H, D], output [D, V]).
INPUT_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w1": 1, "w2": 1, "w3": 1, "output": 1}


def array_bytes(shape, dtype) -> int:
    return math.prod(shape) * jnp.dtype(dtype).itemsize


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ConfigError(f"quantization must be one of {', '.join(METHODS)}, got {method!r}")
    return method


@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized weight and its scales; w ~ q * scale.

    `n_out` (static) is the number of trailing output axes of `q`, which `scale` shares.
    `native` (static, FP8 only): multiply FP8 activations (FP8 x FP8 dots, for GPUs with FP8
    matmuls) instead of converting the weight to the activations' dtype.
    `group` (static, int4): inputs per scale along the last input axis (0: one scale per output
    channel); `in_axes` (static, with `group`): how many of q's axes are inputs.
    """

    q: Any  # [lead..., in..., out...] int8 / float8_e4m3fn; int4: uint8, in[-1] as [groups, g/2]
    scale: Any  # [lead..., out...] float32; int4: [lead..., in[:-1]..., in[-1] / group, out...]
    n_out: int = 1
    native: bool = False
    group: int = 0
    in_axes: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        if not self.group:
            return self.q.shape
        last, q = self._last, self.q.shape
        return q[:last] + (self.group * q[last],) + q[last + 2:]

    @property
    def _last(self) -> int:
        """q's groups axis (int4), the weight's last input axis."""
        return self.n_lead + self.n_in - 1

    @property
    def dtype(self):
        return self.q.dtype

    @property
    def ndim(self) -> int:
        return self.q.ndim

    @property
    def nbytes(self) -> int:
        return array_bytes(self.q.shape, self.q.dtype) + array_bytes(self.scale.shape, f32)

    @property
    def method(self) -> str:
        return next(m for m, d in QDTYPE.items() if d == self.q.dtype)

    @property
    def n_in(self) -> int:
        return self.in_axes if self.group else self.q.ndim - self.scale.ndim

    @property
    def n_lead(self) -> int:
        return self.q.ndim - self.n_in - self.n_out - (1 if self.group else 0)

    def __getitem__(self, index):
        """`w[...]` is `w` itself; `w[i]` is layer i of a stacked weight."""
        if index is Ellipsis:
            return self
        if isinstance(index, int) and self.n_lead:
            return dataclasses.replace(self, q=self.q[index], scale=self.scale[index])
        raise TypeError(f"a QArray is indexed with ... or a layer index, not {index!r}")

    def reshape(self, *shape) -> "QArray":
        """The same weight viewed as `shape`: its last axis holds all the output channels
        (e.g. wq [D, N, H] as the matrix [D, N*H]), or it keeps the output axes as they are."""
        shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        lead = self.shape[:self.n_lead]
        out = self.shape[len(self.shape) - self.n_out:]
        if tuple(shape[-len(out):]) == out:
            new_out = out
        elif shape[-1] == math.prod(out):
            new_out = (shape[-1],)
        else:
            raise ValueError(f"cannot view a weight of shape {self.shape} with output axes "
                             f"{out} as {shape}")
        if tuple(shape[:len(lead)]) != lead or len(shape) <= len(lead) + len(new_out):
            raise ValueError(f"cannot view a weight of shape {self.shape} as {shape}")
        new_in = tuple(shape[len(lead):len(shape) - len(new_out)])
        if not self.group:
            return QArray(self.q.reshape(shape), self.scale.reshape(lead + new_out),
                          len(new_out), self.native)
        if new_in[-1] % self.group:  # the groups must stay whole along the last input axis
            raise ValueError(f"cannot view a weight of shape {self.shape} in groups of "
                             f"{self.group} inputs as {shape}")
        s_shape = lead + new_in[:-1] + (new_in[-1] // self.group,) + new_out
        q_shape = lead + new_in[:-1] + (new_in[-1] // self.group, self.group // 2) + new_out
        return QArray(self.q.reshape(q_shape), self.scale.reshape(s_shape), len(new_out),
                      self.native, self.group, len(new_in))

    def einsum(self, eq: str, x: jax.Array, out_dtype=None) -> jax.Array:
        """`jnp.einsum(eq, x, w)` as (x @ q) * scale, accumulated in float32.

        `eq`'s output must end with the weight's output axes (as every matmul in model.py).
        """
        w_spec, out_spec = eq.split(",")[1].split("->")
        if (self.n_lead or len(w_spec) != len(self.shape)
                or not out_spec.endswith(w_spec[-self.n_out:])):
            raise ValueError(f"{eq!r} does not fit a weight {self.shape} with {self.n_out} "
                             "output axes (stacked weights are used per layer)")
        x_spec = eq.split(",")[0]
        matrix = (self.q.ndim == 2 + bool(self.group) and x_spec[-1] == w_spec[0]
                  and out_spec == x_spec[:-1] + w_spec[1])  # x [..., in] @ w [in, out]
        if self.group:
            y = (int4.matmul(x, self.q, self.scale) if matrix else
                 jnp.einsum(eq, x, self.dequantize(x.dtype), preferred_element_type=f32))
            return y.astype(out_dtype or x.dtype)
        if self.q.dtype == QDTYPE["fp8"] and self.native:
            # Each row of x to e4m3 with its own scale (a factor of its output row), so both
            # operands are FP8 and XLA can use the hardware's FP8 GEMM.
            xs = jnp.max(jnp.abs(x.astype(f32)), axis=-1, keepdims=True)
            xs = jnp.where(xs > 0, xs / QMAX["fp8"], 1.0)
            x8 = jnp.clip(x.astype(f32) / xs, -QMAX["fp8"], QMAX["fp8"]).astype(self.q.dtype)
            y = jnp.einsum(eq, x8, self.q, preferred_element_type=f32)
            y = y * xs.reshape(xs.shape[:-1] + (1,) * self.n_out)
        else:
            def whole(x, q):
                return jnp.einsum(eq, x, q.astype(x.dtype), preferred_element_type=f32)
            y = (jax.lax.platform_dependent(x, self.q, cpu=cpu_matmul.eight_bit, default=whole)
                 if matrix else whole(x, self.q))  # on CPU a chunk at a time (cpu_matmul)
        return (y * self.scale).astype(out_dtype or x.dtype)

    def dequantize(self, dtype=f32) -> jax.Array:
        if not self.group:
            return (self.q.astype(f32) * _expand(self.scale, self)).astype(dtype)
        return int4.dequantize(self.q, self.scale, self._last, dtype)

    def weight_sharding(self):
        """The sharding of the weight this stands for (its codes' without int4's g/2 axis)."""
        s = self.q.sharding
        if not self.group:
            return s
        spec = tuple(s.spec) + (None,) * (self.q.ndim - len(s.spec))
        return NamedSharding(s.mesh, PartitionSpec(*spec[:self._last + 1],
                                                   *spec[self._last + 2:]))

    def codes(self) -> jax.Array:
        """The quantized values in the weight's shape (int4: unpacked to int8)."""
        if not self.group:
            return self.q
        return int4.unpack(self.q, self._last).reshape(self.shape)


jax.tree_util.register_dataclass(QArray, data_fields=("q", "scale"),
                                 meta_fields=("n_out", "native", "group", "in_axes"))


def has_fp8_matmuls() -> bool:
    """Whether the first device multiplies FP8 x FP8 in hardware (compute capability 8.9+:
    Ada, Hopper); `native_fp8=None` means this."""
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)  # "9.0" on an H100
    return device.platform == "gpu" and capability is not None and float(capability) >= 8.9


def _expand(scale, w: QArray):
    """`scale` broadcastable against `w.q`: size-1 axes where q has its input axes."""
    lead = scale.ndim - w.n_out
    return scale.reshape(scale.shape[:lead] + (1,) * w.n_in + scale.shape[lead:])


def quantize(w, method: str, n_in: int, n_lead: int = 0, native: bool = False,
             name: str = "a weight") -> QArray:
    """Symmetric absmax quantization of `w` [lead..., in..., out...]: per output channel
    (int8, fp8), or per group of `int4.group_size` inputs along the last input axis and
    output channel (int4: codes two per byte).

    Args:
      w: the weight (any float dtype; computed in float32).
      method: "int8", "fp8" or "int4".
      n_in: how many axes after the `n_lead` leading ones are the matmul's inputs.
      native: FP8 x FP8 dots (see QArray); only for method "fp8".
      name: the weight's, in errors.
    Returns:
      QArray with |w - q * scale| <= scale / 2 (int8, int4), or e4m3's relative rounding (FP8:
      2^-4 of |w| for normal values, scale * 2^-10 below them).
    """
    if method not in QDTYPE:
        raise ConfigError(f"quantize: method must be one of {', '.join(QDTYPE)}, got {method!r}")
    w = jnp.asarray(w).astype(f32)
    if method == "int4":
        q, scale, g = int4.quantize(w, n_lead + n_in - 1, name)
        return QArray(q, scale, w.ndim - n_lead - n_in, False, g, n_in)
    axes = tuple(range(n_lead, n_lead + n_in))
    amax = jnp.max(jnp.abs(w), axis=axes)  # [lead..., out...]
    scale = jnp.where(amax > 0, amax / QMAX[method], 1.0)
    ws = w / jnp.expand_dims(scale, axes)
    if method == "int8":
        q = jnp.clip(jnp.round(ws), -127, 127).astype(jnp.int8)
    else:  # the cast rounds to nearest; clipping keeps a rounding overshoot off NaN
        q = jnp.clip(ws, -448.0, 448.0).astype(jnp.float8_e4m3fn)
    return QArray(q, scale, w.ndim - n_lead - n_in, native and method == "fp8")


# -- parameter trees ---------------------------------------------------------------------------
def quantizable(path) -> bool:
    """Whether the parameter at `path` (a tuple of names) is quantized."""
    return path[-1] in INPUT_AXES


def _lead(path) -> int:
    return 1 if path[0] == "layers" else 0


def quantize_param(path, w, method: str) -> QArray:
    return quantize(w, method, INPUT_AXES[path[-1]], _lead(path), name="/".join(path))


def scale_axes(path, axes: tuple, method: str = "int8") -> tuple:
    """Logical axes of a weight's scales: its axes without the input ones (8-bit), or all of
    them, the groups taking their input axis's name (int4)."""
    if method == "int4":
        return tuple(axes)
    lead = _lead(path)
    return axes[:lead] + axes[lead + INPUT_AXES[path[-1]]:]


def scale_shape(path, shape: tuple, method: str = "int8") -> tuple:
    """The shape of the scales of a weight of `shape` at `path` (with or without its L axis:
    `path` ("layers", ...) has it, a path of the weight's own name has not)."""
    if method != "int4":
        return scale_axes(path, tuple(shape))
    last = _lead(path) + INPUT_AXES[path[-1]] - 1
    return (*shape[:last], shape[last] // int4.group_size(shape[last], "/".join(path)),
            *shape[last + 1:])


def q_shape(path, shape: tuple, method: str) -> tuple:
    """The shape of the codes of a weight of `shape` (int4: two per byte, the last input axis
    as [groups, group / 2])."""
    if method != "int4":
        return tuple(shape)
    last = _lead(path) + INPUT_AXES[path[-1]] - 1
    g = int4.group_size(shape[last], "/".join(path))
    return (*shape[:last], shape[last] // g, g // 2, *shape[last + 1:])


def q_axes(path, axes: tuple, method: str) -> tuple:
    """Logical axes of a weight's codes (int4: the groups and the half groups both take the
    input axis's name: the groups are split over its mesh axes where they divide them, else
    each group's bytes are, as 7B's 86 groups of w2 over tensor=8; a dot's partial sums
    over a split group still add up, scaled by the group's scale)."""
    if method != "int4":
        return tuple(axes)
    last = _lead(path) + INPUT_AXES[path[-1]] - 1
    return (*axes[:last + 1], axes[last], *axes[last + 1:])


def method_of(params) -> str:
    """"int8", "fp8", "int4" or "none": how the weights in a parameter tree are stored."""
    methods = {x.method for x in jax.tree.leaves(params, is_leaf=_is_q) if _is_q(x)}
    if len(methods) > 1:
        raise ConfigError(f"parameters mix quantization methods {sorted(methods)}")
    return methods.pop() if methods else "none"


def _is_q(x) -> bool:
    return isinstance(x, QArray)

def to_tree(params: Mapping) -> dict:
    """Nested dict with every QArray as {"q": ..., "scale": ...}: what orbax saves."""
    return {k: ({"q": v.q, "scale": v.scale} if _is_q(v)
                else to_tree(v) if isinstance(v, Mapping) else v) for k, v in params.items()}


def from_tree(tree: Mapping, path: tuple = ()) -> dict:
    """Inverse of to_tree: {"q", "scale"} dicts at quantizable paths become QArrays."""
    out = {}
    for k, v in tree.items():
        p = (*path, k)
        if isinstance(v, Mapping) and quantizable(p) and set(v) == {"q", "scale"}:
            q_shape, s_shape = tuple(v["q"].shape), tuple(v["scale"].shape)
            if jnp.dtype(v["q"].dtype) == QDTYPE["int4"]:  # [..., groups, group / 2, out...]
                n_in, last = INPUT_AXES[p[-1]], _lead(p) + INPUT_AXES[p[-1]] - 1
                out[k] = QArray(v["q"], v["scale"], len(s_shape) - last - 1, False,
                                2 * q_shape[last + 1], n_in)
            else:
                out[k] = QArray(v["q"], v["scale"], len(s_shape) - _lead(p))
        elif isinstance(v, Mapping):
            out[k] = from_tree(v, p)
        else:
            out[k] = v
    return out


def map_params(fn, params: Mapping, path: tuple = ()) -> dict:
    """fn(path, leaf) over a nested param dict, QArrays passed whole."""
    return {k: (map_params(fn, v, (*path, k)) if isinstance(v, Mapping) and not _is_q(v)
                else fn((*path, k), v)) for k, v in params.items()}


def abstract_params(cfg_target: Mapping, axes: Mapping, mesh: Mesh, method: str) -> dict:
    """The restore target of quantized weights: each quantizable ShapeDtypeStruct of the
    unquantized `cfg_target` becomes a QArray of ShapeDtypeStructs, scales sharded along the
    weight's output axes (`axes`: the logical axes of every parameter)."""
    if method == "none":
        return dict(cfg_target)

    def leaf(path, t):
        if not quantizable(path):
            return t
        ax = get_path(axes, path)
        s_shape, s_axes = scale_shape(path, t.shape, method), scale_axes(path, ax, method)
        shape = q_shape(path, t.shape, method)
        q = jax.ShapeDtypeStruct(shape, QDTYPE[method], sharding=sharding.named_sharding(
            mesh, q_axes(path, ax, method), shape))
        s = jax.ShapeDtypeStruct(s_shape, f32,
                                 sharding=sharding.named_sharding(mesh, s_axes, s_shape))
        return from_tree({path[-1]: {"q": q, "scale": s}}, path[:-1])[path[-1]]
    return map_params(leaf, cfg_target)


def get_path(tree, path):
    """tree[path[0]][path[1]]..."""
    for k in path:
        tree = tree[k]
    return tree


def param_axes(model) -> dict:
    """Nested dict of every parameter's logical axes."""
    state = nnx.state(model, nnx.Param)
    return nnx.to_pure_dict(jax.tree.map(lambda v: v.axes, state,
                                         is_leaf=lambda x: isinstance(x, nnx.Variable)))


def quantize_params(params: Mapping, method: str, target: Mapping | None = None) -> dict:
    """Quantize every quantizable weight of a nested param dict, on device.

    With `target` (from `abstract_params`) the results are placed in its shardings; each
    weight's full-precision input may be freed by the caller as soon as this returns.
    """
    if check_method(method) == "none":
        return dict(params)

    def leaf(path, w):
        if not quantizable(path):
            return w
        if _is_q(w):
            raise ConfigError(f"{'/'.join(path)} is already {w.method}-quantized")
        shardings = None if target is None else jax.tree.map(lambda t: t.sharding,
                                                             get_path(target, path))
        fn = jax.jit(quantize_param, static_argnums=(0, 2), out_shardings=shardings)
        return fn(path, w, method)
    return map_params(leaf, params)


def dequantize_params(params: Mapping, dtype, shardings: Mapping | None = None) -> dict:
    """QArrays and the embedding table of a param dict as `dtype` arrays (in `shardings`)."""
    def leaf(path, w):
        if not _is_q(w):
            return w.astype(dtype) if path == ("tok_embeddings",) else w
        s = None if shardings is None else get_path(shardings, path)
        return jax.jit(lambda w: w.dequantize(dtype), out_shardings=s)(w)
    return map_params(leaf, params)


def quantize_model(model, method: str, native_fp8: bool | None = False):
    """A copy of `model` with its weights quantized in place on their devices (scales sharded
    like their weights' output axes). `method` "none" returns the model itself. FP8 weights
    with `native_fp8` multiply FP8 activations (None: where the device has FP8 matmuls)."""
    if check_method(method) == "none":
        return model
    if method == "fp8" and native_fp8 is not False:
        return use_native_fp8(quantize_model(model, method), native_fp8)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    leaves = jax.tree.leaves(params)
    mesh = leaves[0].sharding.mesh if hasattr(leaves[0].sharding, "mesh") else None
    target = None
    if mesh is not None:
        sds = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                           params)
        target = abstract_params(sds, param_axes(model), mesh, method)
    nnx.replace_by_pure_dict(state, quantize_params(params, method, target))
    return nnx.merge(graphdef, state)


def use_native_fp8(model, on: bool | None = True):
    """`model` with its FP8 weights set to multiply FP8 activations (`on`), or not (None:
    where the device has FP8 matmuls); int8 and unquantized weights are left as they are."""
    on = has_fp8_matmuls() if on is None else bool(on)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params = map_params(lambda _, w: dataclasses.replace(w, native=on)
                        if _is_q(w) and w.method == "fp8" else w, params)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def weight_bytes(model) -> int:
    """Bytes of the model's parameters as stored (quantized weights, their scales, the rest)."""
    return sum(array_bytes(x.shape, x.dtype) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
