"""Orbax checkpoints of llama2_jax models, restored straight onto any mesh.

A checkpoint directory holds:
  llama2_jax.json   {"format": 1, "model": ModelConfig fields}; quantized weights:
                    {"format": 2, "quantization": "int8" | "fp8", "model": ...}
  params/           orbax (StandardCheckpointer) tree of the model's parameters; a quantized
                    weight is two arrays, `<name>/q` (8-bit) and `<name>/scale` (float32)
  tokenizer.model   optional: the tokenizer the weights were trained with
It is written under a temporary name and renamed when complete, so a directory with
`llama2_jax.json` is always whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
from orbax.checkpoint._src.serialization import type_handler_registry

from llama2_jax.model import quant, sharding
from llama2_jax.model.config import ModelConfig
from llama2_jax.model.transformer import Transformer, abstract_model, init_model

META_FILE = "llama2_jax.json"
PARAMS_DIR = "params"
TOKENIZER_FILE = "tokenizer.model"
# The marker of a LoRA adapter directory (llama2_jax.model.adapter): named here so that loading
# one as a model says what it is.
ADAPTER_META_FILE = "llama2_jax_adapter.json"
FORMAT = 1
# Quantized checkpoints get their own format number, so loaders that predate quantization
# refuse them by format instead of by their unexpected parameter names.
QUANT_FORMAT = 2


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit the model."""


# `quantization` of a load: keep the weight format the checkpoint stores (the one spelling;
# configs write it too).
AS_STORED = ""


def default_dtype() -> str:
    """bfloat16 on accelerators, float32 on CPU."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def default_mesh(cfg: ModelConfig, devices=None) -> Mesh:
    """Tensor parallelism over all devices when the heads allow it, else FSDP."""
    n = len(jax.devices() if devices is None else devices)
    if cfg.n_heads % n == 0:
        return sharding.make_mesh(data=1, fsdp=1, tensor=n, devices=devices)
    return sharding.make_mesh(data=1, fsdp=n, tensor=1, devices=devices)


def param_shardings(model: Transformer, mesh: Mesh) -> dict:
    """Pure-dict tree of NamedShardings for the model's parameters (abstract or concrete)."""
    state = nnx.state(model, nnx.Param)
    return nnx.to_pure_dict(jax.tree.map(
        lambda v: sharding.named_sharding(mesh, v.axes, v.get_value().shape), state,
        is_leaf=lambda x: isinstance(x, nnx.Variable)))


def table_dtype(cfg: ModelConfig, stored=None) -> np.dtype:
    """The embedding table's dtype beside quantized weights: as stored (`stored`; None:
    bfloat16, as Meta's Llama 2 checkpoints hold it) where that is narrower than the model's
    dtype. The gather converts the rows it reads, exactly; a 7B table on CPU (float32 compute)
    then takes 0.26 GB instead of 0.52."""
    stored = np.dtype(stored or jax.numpy.bfloat16)
    return stored if stored.itemsize < cfg.weight_dtype.itemsize else np.dtype(cfg.weight_dtype)


def abstract_target(cfg: ModelConfig, mesh: Mesh, quantization: str = "none", table=None):
    """(graphdef, state, target): target is the pure dict of sharded ShapeDtypeStructs of the
    parameters, with QArrays of them for weights stored `quantization` (and then the embedding
    table in `table_dtype(cfg, table)`)."""
    abstract = abstract_model(cfg)
    graphdef, state = nnx.split(abstract)
    shardings = param_shardings(abstract, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, cfg.weight_dtype, sharding=s),
                          nnx.to_pure_dict(state), shardings)
    if quantization != "none":
        t = target["tok_embeddings"]
        target["tok_embeddings"] = jax.ShapeDtypeStruct(t.shape, table_dtype(cfg, table),
                                                        sharding=t.sharding)
    target = quant.abstract_params(target, quant.param_axes(abstract), mesh, quantization)
    return graphdef, state, target


def abstract_model_on(cfg: ModelConfig, mesh: Mesh, quantization: str = "none") -> Transformer:
    """The model with sharded ShapeDtypeStruct leaves on `mesh` (nothing allocated): what a
    step is lowered on ahead of time, e.g. for the devices of a TPU topology."""
    graphdef, state, target = abstract_target(cfg, mesh, quantization)
    return _merge(graphdef, state, target)


def _merge(graphdef, state, params: dict) -> Transformer:
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def from_params(cfg: ModelConfig, params: dict, mesh: Mesh | None = None) -> Transformer:
    """Model from a nested dict of arrays (numpy or jax) laid out as llama2_jax's parameters."""
    mesh = mesh or default_mesh(cfg)
    sharding.check_mesh(mesh, cfg.n_heads, cfg.n_kv_heads)
    graphdef, state, target = abstract_target(cfg, mesh)
    _check_tree(target, jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                                     params), "params")
    placed = jax.tree.map(lambda x, t: jax.device_put(np.asarray(x).astype(t.dtype), t.sharding),
                          params, target)
    return _merge(graphdef, state, placed)


def random_model(cfg: ModelConfig, mesh: Mesh | None = None, seed: int = 0) -> Transformer:
    """Randomly initialised model created directly in its shards (no full copy on one device)."""
    mesh = mesh or default_mesh(cfg)
    sharding.check_mesh(mesh, cfg.n_heads, cfg.n_kv_heads)
    graphdef, state, target = abstract_target(cfg, mesh)
    out_shardings = jax.tree.map(lambda t: t.sharding, target)

    def init():
        return nnx.to_pure_dict(nnx.state(init_model(cfg, seed), nnx.Param))

    params = jax.jit(init, out_shardings=out_shardings)()
    return _merge(graphdef, state, params)


def params_of(model: Transformer) -> dict:
    """Nested dict of the model's parameters (quantized weights as QArrays)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def save(directory: str | os.PathLike, model: Transformer, *,
         tokenizer_path: str | os.PathLike | None = None, overwrite: bool = False) -> str:
    """Write `model` (params + config, and the tokenizer if given) to `directory`, atomically.

    An existing directory is refused unless `overwrite`; it is replaced only once the new
    checkpoint is complete. Quantized weights are saved quantized.
    """
    with staged_dir(directory, overwrite) as tmp:
        ckptr = ocp.StandardCheckpointer()
        params = params_of(model)
        ckptr.save(os.path.join(tmp, PARAMS_DIR), quant.to_tree(params))
        ckptr.wait_until_finished()
        if jax.process_index() == 0:
            if tokenizer_path is not None:
                shutil.copyfile(tokenizer_path, os.path.join(tmp, TOKENIZER_FILE))
            write_config(tmp, model.config, quant.method_of(params))
    return os.path.abspath(os.fspath(directory))


@contextlib.contextmanager
def staged_dir(directory: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary sibling of `directory` (the same name in every process, which all
    write into it); when the block ends, process 0 renames it to `directory`.

    An existing `directory` is refused unless `overwrite`, and replaced only by a complete
    new one; an error (or a kill) leaves it as it was.
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not overwrite:
        raise CheckpointError(f"{directory} already exists; pass overwrite=True to replace it")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(directory)}.tmp-{_shared_suffix()}")
    try:
        yield tmp
        if jax.process_index() == 0:
            replace_dir(tmp, directory)
        _sync("llama2_jax_checkpoint_save")
    finally:
        if jax.process_index() == 0 and os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def write_config(directory: str, cfg: ModelConfig, quantization: str = "none",
                 **extra: Any) -> None:
    """Write the checkpoint's metadata file (the marker of a complete checkpoint)."""
    if quant.check_method(quantization) == "none":
        meta = {"format": FORMAT, "model": cfg.to_dict(), **extra}
    else:
        meta = {"format": QUANT_FORMAT, "quantization": quantization, "model": cfg.to_dict(),
                **extra}
    path = os.path.join(directory, META_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def replace_dir(src: str, dst: str) -> None:
    """Move the complete directory `src` to `dst`, replacing `dst` only once `src` is there."""
    if os.path.exists(dst):
        parent, base = os.path.split(dst)
        old = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex[:8]}")
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)


def _shared_suffix() -> str:
    """A random name part, the same in every process (they write one checkpoint together)."""
    suffix = np.frombuffer(uuid.uuid4().bytes[:4], np.uint8)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        suffix = np.asarray(multihost_utils.broadcast_one_to_all(suffix))
    return bytes(suffix.astype(np.uint8)).hex()


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def read_config(directory: str | os.PathLike) -> ModelConfig:
    return read_meta(directory)[0]


def read_meta(directory: str | os.PathLike) -> tuple[ModelConfig, str]:
    """(model config, how its weights are stored: "none", "int8" or "fp8")."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    path = os.path.join(directory, META_FILE)
    if not os.path.isfile(path) and os.path.isfile(os.path.join(directory, ADAPTER_META_FILE)):
        raise CheckpointError(f"{directory} is a LoRA adapter, not a model: load the base model "
                              "it names and apply it (llama2_jax.model.adapter)")
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{directory} is not a llama2_jax checkpoint (no {META_FILE}); convert weights with "
            "convert/meta_to_orbax.py or convert/hf_to_orbax.py, or it is an incomplete write")
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format") not in (FORMAT, QUANT_FORMAT) or "model" not in meta:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r}, "
                              f"expected {FORMAT} or {QUANT_FORMAT}")
    stored = meta.get("quantization", "none") if meta["format"] == QUANT_FORMAT else "none"
    if stored not in quant.METHODS[1:] and meta["format"] == QUANT_FORMAT:
        raise CheckpointError(f"{path}: unknown quantization {stored!r}")
    return ModelConfig.from_dict(meta["model"], source=path), stored


def tokenizer_path(directory: str | os.PathLike) -> str | None:
    path = os.path.join(os.fspath(directory), TOKENIZER_FILE)
    return path if os.path.isfile(path) else None


def load(directory: str | os.PathLike, *, mesh: Mesh | None = None,
         dtype: str = "", quantization: str = AS_STORED) -> Transformer:
    """Restore a checkpoint onto `mesh`, each device reading only its own shards.

    Args:
      directory: a checkpoint written by `save` or by the converters.
      mesh: target mesh (default: `default_mesh`).
      dtype: compute and parameter dtype; weights are cast while loading
        (default: bfloat16 on accelerators, float32 on CPU).
      quantization: AS_STORED ("", as stored), "none", "int8" or "fp8". Weights of an unquantized
        checkpoint are quantized while they are read, one layer of one weight at a time, so
        memory stays near the quantized model's size. "none" dequantizes a quantized
        checkpoint into `dtype`; a checkpoint stored in the other 8-bit format is refused.
    """
    directory = os.path.abspath(os.fspath(directory))
    cfg, stored = read_meta(directory)
    want = stored if quantization == AS_STORED else quant.check_method(quantization)
    if "none" not in (stored, want) and want != stored:
        raise CheckpointError(f"{directory} holds {stored} weights: load it with quantization="
                              f"{stored!r} (or 'none' to dequantize), not {want!r}")
    cfg = cfg.with_dtype(dtype or default_dtype())
    mesh = mesh or default_mesh(cfg)
    sharding.check_mesh(mesh, cfg.n_heads, cfg.n_kv_heads)
    params_dir = os.path.join(directory, PARAMS_DIR)
    ckptr = ocp.StandardCheckpointer()
    try:
        found = ckptr.metadata(params_dir).item_metadata.tree
    except Exception as e:  # orbax raises several types for a missing/corrupt tree
        raise CheckpointError(f"{params_dir}: cannot read orbax metadata ({e})") from None
    table = getattr(found.get("tok_embeddings"), "dtype", None)
    graphdef, state, target = abstract_target(cfg, mesh, stored, table)
    _check_tree(quant.to_tree(target), found, params_dir)
    if want != stored and stored == "none":
        params = _restore_quantizing(params_dir, abstract_target(cfg, mesh, want, table)[2],
                                     want)
    else:
        params = quant.from_tree(ckptr.restore(params_dir, quant.to_tree(target)))
        if want != stored:  # quantized on disk, "none" asked
            plain = abstract_target(cfg, mesh)[2]
            params = quant.dequantize_params(params, cfg.weight_dtype,
                                             jax.tree.map(lambda t: t.sharding, plain))
    return _merge(graphdef, state, params)


def _restore_quantizing(params_dir: str, target: dict, method: str) -> dict:
    """Restore an unquantized checkpoint into `target` (from `abstract_target(..., method)`),
    quantizing on device as it reads.

    Each device reads its own part of one layer of one weight (through the checkpoint's
    tensorstore arrays), the layer is quantized and written into the stacked 8-bit buffers,
    and its full-precision copy is dropped before the next is read.
    """
    stores = open_params(params_dir)

    def leaf(path, t):
        store = quant.get_path(stores, path)
        if not isinstance(t, quant.QArray):
            return _read(store, t)
        if path[0] != "layers":
            w = _read(store, jax.ShapeDtypeStruct(t.shape, _stored_dtype(store),
                                                  sharding=t.weight_sharding()))
            return quant.quantize_params({path[0]: w}, method, {path[0]: t})[path[0]]
        shardings = jax.tree.map(lambda x: x.sharding, t)
        buf = jax.jit(lambda: jax.tree.map(lambda x: jax.numpy.zeros(x.shape, x.dtype), t),
                      out_shardings=shardings)()
        layer = jax.ShapeDtypeStruct(t.shape[1:], _stored_dtype(store),
                                     sharding=_drop_leading(t.weight_sharding()))
        n_in = quant.INPUT_AXES[path[-1]]

        def put(buf, w, i):
            new = quant.quantize(w, method, n_in)
            return jax.tree.map(lambda b, x: b.at[i].set(x), buf, new)
        put = jax.jit(put, donate_argnums=0, out_shardings=shardings)
        for i in range(t.shape[0]):
            # Waiting for each layer keeps reads from running ahead of the device: queued
            # steps would each hold a full-precision layer.
            buf = jax.block_until_ready(put(buf, _read(store, layer, (i,)), i))
        return buf
    # The big global arrays first, while little else is in memory: their full-precision
    # copies (a few hundred MB for 7B) then do not add to the peak of the whole model.
    keys = sorted(target, key=lambda k: k == "layers")
    return {k: quant.map_params(leaf, {k: target[k]})[k] for k in keys}


def _stored_dtype(store) -> np.dtype:
    return np.dtype(store.dtype.numpy_dtype)


def _drop_leading(s: NamedSharding) -> NamedSharding:
    """The sharding of one layer of a stacked array (the layer axis is never split)."""
    return NamedSharding(s.mesh, PartitionSpec(*tuple(s.spec)[1:]))


def _read(store, t: jax.ShapeDtypeStruct, prefix: tuple = ()) -> jax.Array:
    """store[prefix] as an array like `t`, each device reading only its own slice."""
    def shard(index):
        data = store[prefix + tuple(index)].read().result()
        return np.asarray(data).astype(t.dtype)
    return jax.make_array_from_callback(t.shape, t.sharding, shard)


class _Lazy:
    """Restore type: the opened tensorstore instead of the data."""


class _OpeningHandler(ocp.type_handlers.NumpyHandler):
    async def deserialize(self, infos, args=None):
        stores = []
        for info in infos:
            await info.await_path_creation()
            spec = ts_utils.build_array_read_spec(info, use_ocdbt=info.is_ocdbt_checkpoint).json
            stores.append(await ts.open(ts.Spec(spec), open=True, context=info.ts_context))
        return stores


# Unused, but orbax disables its array-metadata store (with a warning) without one.
_ARRAY_HANDLER = ((jax.Array, ocp.type_handlers.ArrayHandler()),)


def open_params(params_dir: str) -> dict:
    """The orbax tree at `params_dir` as a nested dict of tensorstore arrays, opened but not
    read: `store[i].read().result()` reads layer i only."""
    tree = ocp.StandardCheckpointer().metadata(params_dir).item_metadata.tree
    registry = type_handler_registry.create_type_handler_registry((_Lazy, _OpeningHandler()),
                                                                  *_ARRAY_HANDLER)
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=_Lazy), tree)
    return ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(restore_args=args))


def _check_tree(expected, found, where: str) -> None:
    """Raise CheckpointError naming the first parameter whose presence or shape differs."""
    exp = {_path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    got = {_path_str(p): tuple(x.shape)
           for p, x in jax.tree_util.tree_leaves_with_path(found, is_leaf=_has_shape)}
    missing = sorted(set(exp) - set(got))
    if missing:
        raise CheckpointError(f"{where}: parameter(s) missing from the checkpoint: {missing}")
    extra = sorted(set(got) - set(exp))
    if extra:
        raise CheckpointError(f"{where}: unexpected parameter(s) in the checkpoint: {extra}")
    for key, shape in exp.items():
        if got[key] != shape:
            raise CheckpointError(f"{where}: parameter {key} has shape {got[key]}, the model "
                                  f"config expects {shape}")


def _has_shape(x) -> bool:
    return hasattr(x, "shape") and not isinstance(x, dict)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
