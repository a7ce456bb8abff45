"""Export a llama2_jax checkpoint to a Hugging Face LlamaForCausalLM directory.

  python -m convert.orbax_to_hf --checkpoint_dir=ckpt/llama2-7b-sft --output_dir=Llama-2-7b-sft-hf

Writes sharded safetensors (model-0000N-of-0000M.safetensors + model.safetensors.index.json, or
one model.safetensors), config.json and the tokenizer. Streaming: the safetensors files are laid
out from the config first, then every stored chunk of every parameter is read once and copied into
its place in the memory-mapped output files (file-backed pages, not process memory), whatever the
chunking of the checkpoint (a converter's per-layer chunks or `llama2_jax.save`'s per-shard ones).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import sys
import time


import numpy as np
from absl import app, flags

from convert import common, hf_tokenizer, mapping, orbax_io, verify
from llama2_jax.model import checkpoint
from llama2_jax.model.checkpoint import CheckpointError
from llama2_jax.model.config import ConfigError

FLAGS = flags.FLAGS


def define_flags():
    """The command line (defined only when run as a script, so that tests can import
    several converters)."""
    flags.DEFINE_string("checkpoint_dir", None, "llama2_jax checkpoint directory.")
    flags.DEFINE_string("output_dir", None, "Hugging Face model directory to create.")
    flags.DEFINE_enum("dtype", None, list(common.DTYPES),
                      "Weight dtype to write (default: the checkpoint's).")
    flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors file, e.g. 5GB, 500MB.")
    flags.DEFINE_bool("overwrite", False, "Replace output_dir if it exists.")
    flags.DEFINE_bool("verify", False, "Load the export with transformers and compare its logits "
                      "with the checkpoint's (needs ~8 bytes/parameter of RAM).")
    flags.DEFINE_bool("progress", True, "Show progress bars.")

SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
INDEX_FILE = "model.safetensors.index.json"
def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes (HF's max_shard_size convention: GB = 10^9, GiB = 2^30)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise common.ConversionError(f"--max_shard_size: cannot parse {text!r} (e.g. 5GB, 500MB)")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def plan_files(tensors: list[tuple[str, tuple, int]], max_bytes: int) -> list[list[int]]:
    """Indices of `tensors` ((name, shape, nbytes)) per file, in order, each file <= max_bytes
    unless a single tensor is larger."""
    files, size = [[]], 0
    for i, (_, _, nbytes) in enumerate(tensors):
        if files[-1] and size + nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append(i)
        size += nbytes
    return files


class SafetensorsFile:
    """A safetensors file laid out up front and filled in place through a memory map."""

    def __init__(self, path: str, tensors: list[tuple[str, tuple, np.dtype]]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        self._spans = {}
        for name, shape, dtype in tensors:
            nbytes = int(np.prod(shape)) * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype.name], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._spans[name] = (offset, shape, dtype)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keeps tensor data 8-byte aligned
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + offset)
        self._data = np.memmap(path, np.uint8, "r+", offset=8 + len(raw), shape=(max(offset, 1),))

    def tensor(self, name: str) -> np.ndarray:
        """Writable [out, in] view of tensor `name` in the file."""
        start, shape, dtype = self._spans[name]
        size = int(np.prod(shape)) * dtype.itemsize
        return self._data[start:start + size].view(dtype).reshape(shape)

    def close(self) -> None:
        self._data.flush()
        del self._data


def _chunk_boxes(store, full_axes=()):
    """Index tuples covering `store` chunk by chunk (axes in `full_axes` taken whole)."""
    shape, chunk = store.shape, store.chunk_layout.read_chunk.shape
    ranges = [[slice(0, n)] if a in full_axes else
              [slice(s, min(s + c, n)) for s in range(0, n, c)]
              for a, (n, c) in enumerate(zip(shape, chunk))]
    return itertools.product(*ranges)


def export(checkpoint_dir: str, output_dir: str, *, dtype: str | None = None,
           max_shard_size: str | int = "5GB", overwrite: bool = False,
           verify_logits: bool = False, progress: bool = True) -> float | None:
    """Write the HF directory; returns the --verify logits difference (None without verify)."""
    start = time.perf_counter()
    cfg, stored = checkpoint.read_meta(checkpoint_dir)
    if stored != "none":
        raise common.ConversionError(
            f"{checkpoint_dir} holds {stored} weights; export full-precision ones (e.g. "
            "llama2_jax.save of llama2_jax.load(..., quantization='none'))")
    common.check_output(output_dir, overwrite)
    stores = orbax_io.open_params(os.path.join(checkpoint_dir, checkpoint.PARAMS_DIR))
    for path, stacked in mapping.param_paths():
        want = ((cfg.n_layers,) if stacked else ()) + mapping.jax_shape(path, cfg)
        found = tuple(mapping.get_path(stores, path).shape)
        if found != want:
            raise CheckpointError(f"{checkpoint_dir}: parameter {'/'.join(path)} has shape "
                                  f"{found}, the model config expects {want}")
    out_dtype = common.output_dtype(dtype, stores["tok_embeddings"].dtype.numpy_dtype)
    max_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size

    names = {(path, layer): name for path, layer, name in mapping.hf_names(cfg)}
    tensors = [(name, mapping.torch_shape(path, cfg)) for (path, _), name in names.items()]
    sizes = [int(np.prod(shape)) * out_dtype.itemsize for _, shape in tensors]
    groups = plan_files([(n, s, b) for (n, s), b in zip(tensors, sizes)], max_bytes)
    file_names = (["model.safetensors"] if len(groups) == 1 else
                  [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                   for i in range(len(groups))])

    with common.Progress(n_tensors=len(tensors), n_bytes=sum(sizes), enabled=progress,
                         start=start) as bar, common.staged_output(output_dir, overwrite) as tmp:
        files, where = [], {}
        for file_name, group in zip(file_names, groups):
            files.append(SafetensorsFile(os.path.join(tmp, file_name),
                                         [(*tensors[i], out_dtype) for i in group]))
            where.update({tensors[i][0]: (files[-1], file_name) for i in group})
        for path, stacked in mapping.param_paths():
            store = mapping.get_path(stores, path)
            qk = path[-1] in ("wq", "wk")
            boxes = list(_chunk_boxes(store, full_axes={store.ndim - 1} if qk else ()))
            # Boxes run layer range by layer range: a range's tensors are done at its last box.
            per_range = len(boxes) // len({b[0].start for b in boxes}) if stacked else len(boxes)
            pending = store[boxes[0]].read()
            for i, box in enumerate(boxes):
                data = pending.result()
                if i + 1 < len(boxes):  # the next chunk is read while this one is copied
                    pending = store[boxes[i + 1]].read()
                layers = range(box[0].start, box[0].stop) if stacked else [None]
                for j, layer in enumerate(layers):
                    name = names[(path, layer)]
                    dst = mapping.hf_jax_view(path, where[name][0].tensor(name), cfg)
                    part = data[j] if stacked else data
                    inner = box[1:] if stacked else box
                    if qk:
                        part = part.reshape(*part.shape[:-1], -1, 2)
                        inner = (*inner[:-1], slice(None), slice(None))
                    mapping.copy_rows(dst[inner], part)
                bar.add(data.size, data.size * out_dtype.itemsize,
                        len(layers) if (i + 1) % per_range == 0 else 0)
        for f in files:
            f.close()
        if len(files) > 1:
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": sum(sizes)},
                           "weight_map": {n: fn for n, (_, fn) in where.items()}}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(mapping.hf_config_dict(cfg, out_dtype.name), f, indent=2)
        tokenizer = checkpoint.tokenizer_path(checkpoint_dir)
        if tokenizer:
            shutil.copyfile(tokenizer, os.path.join(tmp, common.TOKENIZER_FILE))
            hf_tokenizer.save(tokenizer, tmp)
    bar.summary("exported to Hugging Face", os.path.abspath(output_dir))
    if verify_logits:
        return verify.compare(checkpoint_dir, lambda: verify.reference_from_dir(output_dir))
    return None


def main(argv):
    del argv
    common.quiet_logs()
    try:
        export(FLAGS.checkpoint_dir, FLAGS.output_dir, dtype=FLAGS.dtype,
               max_shard_size=FLAGS.max_shard_size, overwrite=FLAGS.overwrite,
               verify_logits=FLAGS.verify, progress=FLAGS.progress)
    except (common.ConversionError, CheckpointError, ConfigError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["checkpoint_dir", "output_dir"])
    app.run(main)
