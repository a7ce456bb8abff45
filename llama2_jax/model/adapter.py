"""LoRA adapters on their own: what a fine-tuning run writes beside its merged model, and what
puts them back on their base (a merge, a server, the PEFT converters).

An adapter directory holds:
  llama2_jax_adapter.json  {"format": 1, "type": "lora", "rank", "alpha", "scale" (= alpha /
                           rank: the update is W + scale * a @ b, PEFT's lora_alpha / r),
                           "targets", "dtype", "base": the model they were trained on}
  params/                  orbax (StandardCheckpointer) tree {"layers": {module: {target:
                           {"a": [L, in, r], "b": [L, r, out]}}}}
`base` holds "model" (the base's ModelConfig fields: the shapes follow from them),
"checkpoint_dir" (its path; None for a random init, then "seed"), "quantization" (the format
the base was held in while training: an adapter trained on an 8-bit base learned that base)
and optionally "name" (a Hugging Face id, for the PEFT export). `in` and `out` are the target
weight's input and output axes flattened in llama2_jax's layout: wq [D, N, H] has in D and out
N*H in Meta's interleaved RoPE order; wo [N, H, D] has in N*H.

Written as a model checkpoint is (llama2_jax.model.checkpoint.staged_dir): in a temporary
directory, the JSON marker last, renamed when complete; a directory with the marker is whole.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama2_jax.model import checkpoint, quant, sharding
from llama2_jax.model.checkpoint import ADAPTER_META_FILE as META_FILE
from llama2_jax.model.checkpoint import PARAMS_DIR, CheckpointError
from llama2_jax.model.config import ModelConfig
from llama2_jax.model.transformer import Transformer, abstract_model

FORMAT = 1
# Where each target weight lives and how many leading (input) axes it has.
TARGETS = {"wq": ("attention", 1), "wk": ("attention", 1), "wv": ("attention", 1),
           "wo": ("attention", 2), "w1": ("feed_forward", 1), "w2": ("feed_forward", 1),
           "w3": ("feed_forward", 1)}


class AdapterError(CheckpointError):
    """An adapter directory that is missing, incomplete, or does not fit the model."""


class OverBase:
    """What a weight standing in for `self.base` (a dataclass field) answers as the model reads
    it: the base's shape and dtype, `w[...]`, a `reshape` of the base. Shared by the LoRA weights
    of training (llama2_jax.training.lora) and of serving (llama2_jax.inference.adapters)."""

    @property
    def shape(self):
        return self.base.shape

    @property
    def dtype(self):
        return self.base.dtype

    def __getitem__(self, index):
        if index is not Ellipsis:
            raise TypeError(f"a {type(self).__name__} weight is read whole, as w[...]")
        return self

    def reshape(self, *shape):
        return dataclasses.replace(self, base=self.base.reshape(*shape))


@dataclasses.dataclass(frozen=True)
class Adapter:
    """Rank-`rank` updates W + (alpha / rank) * a @ b of some of a base model's weights.

    `params` is {"layers": {module: {target: {"a": [L, in, r], "b": [L, r, out]}}}}; `base`
    describes the model they belong to (see the module docstring).
    """

    params: dict
    rank: int
    alpha: float
    base: dict

    @property
    def scale(self) -> float:
        return float(self.alpha) / int(self.rank)

    @property
    def targets(self) -> tuple[str, ...]:
        layers = self.params.get("layers", {})
        return tuple(t for t, (module, _) in TARGETS.items() if t in layers.get(module, {}))

    @property
    def base_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.base["model"], source="the adapter's base")


def base_record(cfg: ModelConfig, checkpoint_dir: str | None, quantization: str = "none",
                **extra) -> dict:
    """An Adapter's `base` for a model of `cfg` read from `checkpoint_dir` (None: random)."""
    path = os.path.abspath(checkpoint_dir) if checkpoint_dir else None
    return {"checkpoint_dir": path, "model": cfg.to_dict(), "quantization": quantization,
            **extra}


def shapes(cfg: ModelConfig, targets, rank: int) -> dict[str, tuple[tuple, tuple]]:
    """target -> (a's shape [L, in, r], b's shape [L, r, out]) on a model of `cfg`."""
    weights = checkpoint.params_of(abstract_model(cfg))["layers"]
    out = {}
    for t in targets:
        module, n_in = TARGETS[t]
        w = weights[module][t].shape  # [L, in..., out...]
        fan_in, fan_out = math.prod(w[1:1 + n_in]), math.prod(w[1 + n_in:])
        out[t] = ((w[0], fan_in, rank), (w[0], rank, fan_out))
    return out


def check_fits(adapter: Adapter, cfg: ModelConfig, where: str = "adapter") -> None:
    """Raise AdapterError naming the first tensor whose shape a model of `cfg` contradicts."""
    want = shapes(cfg, adapter.targets, adapter.rank)
    for t, (a_shape, b_shape) in want.items():
        ab = adapter.params["layers"][TARGETS[t][0]][t]
        for part, shape in (("a", a_shape), ("b", b_shape)):
            if tuple(ab[part].shape) != shape:
                raise AdapterError(
                    f"{where}: tensor layers/{TARGETS[t][0]}/{t}/{part} has shape "
                    f"{tuple(ab[part].shape)}, a rank-{adapter.rank} adapter of the model (dim "
                    f"{cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, {cfg.n_kv_heads} KV "
                    f"heads, ffn_dim {cfg.ffn_dim}) needs {shape}")


def save(directory: str | os.PathLike, adapter: Adapter, *, overwrite: bool = False) -> str:
    """Write `adapter` to `directory` atomically (every process calls it, as `checkpoint.save`).

    An existing directory is refused unless `overwrite`; it is replaced only by a complete one.
    """
    if not adapter.targets or adapter.rank < 1:
        raise AdapterError(f"an adapter needs targets and a rank > 0 (rank {adapter.rank})")
    check_fits(adapter, adapter.base_config)
    dtypes = {np.dtype(x.dtype).name for x in jax.tree.leaves(adapter.params)}
    meta = {"format": FORMAT, "type": "lora", "rank": int(adapter.rank),
            "alpha": float(adapter.alpha), "scale": adapter.scale,
            "targets": list(adapter.targets), "dtype": "/".join(sorted(dtypes)),
            "base": adapter.base}
    with checkpoint.staged_dir(directory, overwrite) as tmp:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, PARAMS_DIR), adapter.params)
        ckptr.wait_until_finished()
        if jax.process_index() == 0:
            path = os.path.join(tmp, META_FILE)
            with open(path, "w") as f:
                json.dump(meta, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
    return os.path.abspath(os.fspath(directory))


def read_meta(directory: str | os.PathLike) -> dict:
    """The adapter's metadata file, checked: rank, alpha, targets and base are usable."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise AdapterError(f"adapter directory not found: {directory}")
    path = os.path.join(directory, META_FILE)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(directory, checkpoint.META_FILE)):
            raise AdapterError(f"{directory} is a model checkpoint, not a LoRA adapter")
        raise AdapterError(f"{directory} is not a llama2_jax adapter (no {META_FILE}): an "
                           "incomplete write, or another directory")
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT or meta.get("type") != "lora":
        raise AdapterError(f"{path}: unsupported adapter format {meta.get('format')!r} / type "
                           f"{meta.get('type')!r}, expected {FORMAT} / 'lora'")
    rank, alpha, targets = meta.get("rank"), meta.get("alpha"), meta.get("targets")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"{path}: rank {rank!r} is not a positive integer")
    if not isinstance(alpha, (int, float)):
        raise AdapterError(f"{path}: alpha {alpha!r} is not a number")
    if not targets or not isinstance(targets, list) or set(targets) - set(TARGETS):
        raise AdapterError(f"{path}: targets {targets!r}: expected a non-empty list from "
                           f"{', '.join(TARGETS)}")
    if "scale" in meta and not math.isclose(meta["scale"], alpha / rank, rel_tol=1e-6):
        raise AdapterError(f"{path}: scale {meta['scale']} is not alpha / rank = "
                           f"{alpha} / {rank}")
    if not isinstance(meta.get("base"), dict) or "model" not in meta["base"]:
        raise AdapterError(f"{path}: no base model description ('base': {{'model': ...}})")
    ModelConfig.from_dict(meta["base"]["model"], source=f"{path} (base.model)")
    return meta


def load(directory: str | os.PathLike, *, mesh: Mesh | None = None) -> Adapter:
    """Restore an adapter, replicated over `mesh` (default: all devices), as training holds it.

    The stored tensors are checked against the shapes the base's config gives (an error names
    the tensor) before anything is read.
    """
    directory = os.path.abspath(os.fspath(directory))
    meta = read_meta(directory)
    cfg = ModelConfig.from_dict(meta["base"]["model"])
    want = shapes(cfg, meta["targets"], meta["rank"])
    params_dir = os.path.join(directory, PARAMS_DIR)
    ckptr = ocp.StandardCheckpointer()
    try:
        found = ckptr.metadata(params_dir).item_metadata.tree
    except Exception as e:  # orbax raises several types for a missing/corrupt tree
        raise AdapterError(f"{params_dir}: cannot read orbax metadata ({e})") from None
    expected = {f"layers/{TARGETS[t][0]}/{t}/{part}": shape
                for t, ab in want.items() for part, shape in zip("ab", ab)}
    got = {"/".join(str(getattr(k, "key", k)) for k in p): x
           for p, x in jax.tree_util.tree_leaves_with_path(found)}
    odd = sorted(set(expected) ^ set(got))
    if odd:
        what = "missing from" if odd[0] in expected else "unexpected in"
        raise AdapterError(f"{params_dir}: tensor {odd[0]} {what} the adapter (targets "
                           f"{', '.join(meta['targets'])} in {META_FILE})")
    for name, shape in expected.items():
        if tuple(got[name].shape) != shape:
            raise AdapterError(f"{params_dir}: tensor {name} has shape "
                               f"{tuple(got[name].shape)}, its base model and rank give {shape}")
    replicated = NamedSharding(mesh or sharding.make_mesh(), PartitionSpec())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype,
                                                         sharding=replicated), found)
    params = ckptr.restore(params_dir, target)
    return Adapter(params, meta["rank"], meta["alpha"], meta["base"])


def merge_adapters(params: dict, adapters: dict, scale: float, dtype=None) -> dict:
    """`params` with W + scale * a @ b folded in (in float32, stored in `dtype`, default W's;
    an 8-bit W is dequantized first)."""
    def merge(w, ab):
        delta = jnp.einsum("lir,lro->lio", ab["a"].astype(jnp.float32),
                           ab["b"].astype(jnp.float32)).reshape(w.shape)
        full = w.dequantize(jnp.float32) if isinstance(w, quant.QArray) else w.astype(jnp.float32)
        return (full + scale * delta).astype(dtype or w.dtype)
    out = jax.tree.map(lambda x: x, params)  # a new nested dict, same arrays
    for module, weights in adapters.get("layers", {}).items():
        for name, ab in weights.items():
            out["layers"][module][name] = merge(params["layers"][module][name], ab)
    return out


def merge(model: Transformer, adapter: Adapter) -> Transformer:
    """`model` with `adapter` folded into its weights (on the model's mesh and shardings).

    The model must have full-precision weights (quantize the merged model, if wanted).
    """
    params = checkpoint.params_of(model)
    if quant.method_of(params) != "none":
        raise AdapterError(f"the model holds {quant.method_of(params)} weights: merge the "
                           "adapter into its full-precision weights, then quantize")
    check_fits(adapter, model.config)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    mesh = jax.tree.leaves(shardings)[0].mesh
    adapters = jax.device_put(adapter.params, NamedSharding(mesh, PartitionSpec()))
    merged = jax.jit(lambda p, a: merge_adapters(p, a, adapter.scale),
                     out_shardings=shardings)(params, adapters)
    graphdef, state = nnx.split(abstract_model(model.config))
    nnx.replace_by_pure_dict(state, merged)
    return nnx.merge(graphdef, state)
