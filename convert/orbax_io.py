"""Orbax parameter trees written and read a layer at a time.

The checkpoint is orbax's own (PyTreeCheckpointHandler: OCDBT + zarr, the layout
`llama2_jax.model.checkpoint.load` restores onto any mesh), but the arrays never sit whole in
memory:
each leaf is a `Streamed` parameter that the type handler below pulls one layer at a time and
writes into its slice of the tensorstore array. Stacked parameters are chunked with a leading
layer axis of 1, so a layer's write fills whole chunks and is flushed on its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint._src.serialization import type_handler_registry

from convert import mapping
from convert.common import Progress, output_dtype, staged_output
from llama2_jax.model import checkpoint, quant

CHUNK_BYTES = 32 << 20  # zarr chunk target; a tensor-parallel shard reads only its chunks
WHOLE_BYTES = 64 << 20  # stacked parameters up to this size are written in one piece


@dataclasses.dataclass(frozen=True)
class Streamed:
    """A parameter produced piece by piece while orbax writes it.

    `read(i)` returns layer i ([1:] of `shape`) of a stacked parameter, or the whole array
    (`i` None) of a global one.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[int | None], np.ndarray]
    stacked: bool

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def pieces(self):
        """(index into the full array, array, number of per-layer tensors in it), in order."""
        if not self.stacked:
            yield (), self.read(None), 1
        elif self.nbytes <= WHOLE_BYTES:  # norms: one write instead of L tiny ones
            yield (), np.stack([self.read(i) for i in range(self.shape[0])]), self.shape[0]
        else:
            for i in range(self.shape[0]):
                yield (i,), self.read(i), 1

    def save_args(self) -> ocp.SaveArgs:
        if self.stacked and self.nbytes > WHOLE_BYTES:
            return ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES, shard_axes=(0,))
        return ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES)


class _StreamingHandler(ocp.type_handlers.NumpyHandler):
    """Writes `Streamed` leaves as orbax writes numpy arrays (same spec, same metadata:
    'np.ndarray'), one parameter at a time, one piece at a time."""

    def __init__(self, on_piece: Callable[[np.ndarray, int], None]):
        super().__init__(deepcopy_host_arrays=False)
        self._on_piece = on_piece
        self._lock: asyncio.Lock | None = None

    async def _open_and_write(self, value: Streamed, tspec, ts_context):
        # orbax gathers all leaves' writes at once; the lock makes memory one piece, not a model.
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            store = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
            loop = asyncio.get_running_loop()
            pieces = value.pieces()
            pending = None
            while True:
                # Read (and transpose) the next piece in a thread while the last one is written.
                item = await loop.run_in_executor(None, next, pieces, None)
                if pending is not None:
                    await pending[0]
                    self._on_piece(pending[1], pending[2])
                if item is None:
                    break
                index, data, count = item
                if data.shape != store[index].shape or data.dtype != value.dtype:
                    raise ValueError(f"piece {index} is {data.dtype}{list(data.shape)}, "
                                     f"expected {value.dtype}{list(store[index].shape)}")
                write = store[index].write(data, can_reference_source_data_indefinitely=True)
                pending = (write, data, count)


# Unused, but orbax disables its array-metadata store (with a warning) without one.
_ARRAY_HANDLER = ((jax.Array, ocp.type_handlers.ArrayHandler()),)


def write_params(params_dir: str, tree: dict, on_piece=lambda piece, tensors: None) -> None:
    """Write a nested dict of `Streamed` leaves as an orbax checkpoint at `params_dir`.

    `on_piece(array, tensors)` is called after each piece is on disk, with the number of
    per-layer tensors the piece holds.
    """
    registry = type_handler_registry.create_type_handler_registry(
        (Streamed, _StreamingHandler(on_piece)), *_ARRAY_HANDLER)
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))
    save_args = jax.tree.map(lambda s: s.save_args(), tree)
    ckptr.save(params_dir, args=ocp.args.PyTreeSave(tree, save_args=save_args))
    ckptr.close()


open_params = checkpoint.open_params  # one reader for the library and the converters


def write_checkpoint(source, output_dir: str, *, dtype: str | None = None,
                     overwrite: bool = False, progress: bool = True,
                     start: float | None = None, quantization: str = "none") -> str:
    """Convert an opened `convert.sources.Source` into a llama2_jax checkpoint directory.

    Writes params, tokenizer (if the source has one) and, last, the config marker into a
    temporary sibling that is renamed to `output_dir` when complete. With `quantization`
    "int8" or "fp8" the weights are written quantized (`llama2_jax.model.quant`, the function
    `load(..., quantization=)` uses), a layer at a time. Returns the summary line.
    """
    dtype = output_dtype(dtype, source.dtype)
    quant.check_method(quantization)
    cfg = source.cfg.with_dtype(dtype.name)
    tree: dict = {}
    for path, stacked in mapping.param_paths():
        shape = mapping.jax_shape(path, cfg)
        if quantization != "none" and quant.quantizable(path):
            leaf = _quantized(source, path, cfg, quantization, stacked)
        elif stacked:
            leaf = Streamed((cfg.n_layers, *shape), dtype,
                            lambda i, path=path: source.read(path, i, dtype), True)
        else:
            leaf = Streamed(shape, dtype, lambda _, path=path: source.read(path, None, dtype),
                            False)
        mapping.set_path(tree, path, leaf)
    leaves = jax.tree.leaves(tree)
    with Progress(n_tensors=sum(x.shape[0] if x.stacked else 1 for x in leaves),
                  n_bytes=sum(x.nbytes for x in leaves), enabled=progress,
                  start=start) as bar, \
            staged_output(output_dir, overwrite) as tmp:
        write_params(os.path.join(tmp, checkpoint.PARAMS_DIR), tree,
                     lambda piece, tensors: bar.add(piece.size, piece.nbytes, tensors))
        if source.tokenizer:
            shutil.copyfile(source.tokenizer, os.path.join(tmp, checkpoint.TOKENIZER_FILE))
        checkpoint.write_config(tmp, cfg, quantization,
                                source={"format": source.kind,
                                        "path": os.path.abspath(source.dir)})
    return bar.summary(f"converted {source.kind} checkpoint", os.path.abspath(output_dir))


def _quantized(source, path, cfg, method: str, stacked: bool) -> dict:
    """{"q": Streamed, "scale": Streamed} of one weight, quantized a layer at a time.

    Both come from one quantization of the layer when `q` is written first (orbax's order);
    the scales are kept (a few KB a layer), so `scale` re-reads a layer only otherwise.
    """
    scales: dict = {}

    def layer(i):
        w = source.read(path, i, np.float32)
        qa = quant.quantize(w, method, quant.INPUT_AXES[path[-1]])
        scales[i] = np.asarray(qa.scale)
        return np.asarray(qa.q)

    def scale(i):
        if i not in scales:
            layer(i)
        return scales[i]

    shape = mapping.jax_shape(path, cfg)
    lead = (cfg.n_layers,) if stacked else ()
    s_shape = quant.scale_shape(path[-1:], shape, method)  # the per-layer shape: no L axis
    q_shape = quant.q_shape(path[-1:], shape, method)
    return {"q": Streamed((*lead, *q_shape), quant.QDTYPE[method], layer, stacked),
            "scale": Streamed((*lead, *s_shape), np.dtype(np.float32), scale, stacked)}
