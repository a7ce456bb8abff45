"""Meta and Hugging Face checkpoints as sources: checked whole up front, then read tensor by tensor.

Opening a source reads headers only (torch's zip index, safetensors' JSON header) and maps the
data files: every name, shape and dtype is checked against the config before anything is written,
and tensor data is paged in from the files only when a tensor is read.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re

import ml_dtypes
import numpy as np
import torch
from tqdm import tqdm

from convert import mapping
from convert.common import ConversionError
from llama2_jax.model.config import ModelConfig, from_hf_config, from_meta_params

META_PARAMS = "params.json"
META_CHECKLIST = "checklist.chk"
META_IGNORED = {"rope.freqs"}  # precomputed RoPE table in early checkpoints; recomputed by us
HF_CONFIG = "config.json"
HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_SINGLE = ("model.safetensors", "pytorch_model.bin")
_HF_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")
_TORCH_TO_NP = {torch.float32: np.float32, torch.float16: np.float16,
                torch.bfloat16: ml_dtypes.bfloat16}
_ST_TO_NP = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


class SourceError(ConversionError):
    """A source checkpoint that is incomplete, corrupt, or contradicts its config."""


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a CPU tensor (bfloat16 through an int16 view: numpy has none)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _torch_load(path: str) -> dict:
    """State dict of a torch.save file, its tensors mapped from the file (weights only: no
    arbitrary pickle code runs)."""
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # zip/pickle errors come in many types
        raise SourceError(f"{path}: cannot read as a PyTorch checkpoint, truncated or corrupt? "
                          f"({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SourceError(f"{path}: expected a dict of tensors, found {type(sd).__name__}")
    return sd


def _summary(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_names(where: str, found: dict[str, str], expected, ignored=()) -> None:
    """Raise naming the tensors that should not be there (and their file), or are missing.

    Args:
      where: what to name for a missing tensor (a file or the directory).
      found: tensor name -> the file it is in.
    """
    extra = sorted(n for n in found if n not in expected and n not in ignored)
    if extra:
        file = found[extra[0]]
        raise SourceError(f"{file}: unexpected tensor(s) "
                          f"{_summary(n for n in extra if found[n] == file)}")
    missing = set(expected) - set(found)
    if missing:
        raise SourceError(f"{where}: missing tensor(s) {_summary(missing)}")


def check_tensor(file: str, name: str, shape, dtype, expected, hint: str = "") -> None:
    if tuple(shape) != tuple(expected):
        raise SourceError(f"{file}: tensor {name} has shape {tuple(shape)}, expected "
                          f"{tuple(expected)}{hint}")
    if dtype is None:
        raise SourceError(f"{file}: tensor {name} is not float32, float16 or bfloat16")


class Source:
    """A checkpoint whose tensors come out one at a time in llama2_jax layout."""

    kind: str
    cfg: ModelConfig
    dtype: np.dtype  # the dtype the source stores its weights in
    tokenizer: str | None
    files: list[str]

    def read(self, path: tuple[str, ...], layer: int | None, dtype) -> np.ndarray:
        """Parameter `path` of `layer` (None: a global one) as a contiguous `dtype` array."""
        raise NotImplementedError


class MetaSource(Source):
    """Meta's `consolidated.NN.pth` model-parallel shards + `params.json` (+ `checklist.chk`)."""

    kind = "meta"

    def __init__(self, input_dir: str, *, tokenizer: str | None = None,
                 skip_checksum: bool = False, progress: bool = True):
        self.dir = input_dir
        self.tokenizer = tokenizer
        params_path = os.path.join(input_dir, META_PARAMS)
        if not os.path.isfile(params_path):
            raise SourceError(f"{input_dir}: no {META_PARAMS}; is this a Meta Llama 2 download?")
        with open(params_path) as f:
            try:
                params = json.load(f)
            except json.JSONDecodeError as e:
                raise SourceError(f"{params_path}: not valid JSON ({e})") from None
        vocab = None
        if params.get("vocab_size", -1) in (-1, None):
            if tokenizer is None:
                raise SourceError(f"{params_path}: vocab_size is -1 (take it from the "
                                  "tokenizer) but no tokenizer.model was found beside the "
                                  "checkpoint; pass --tokenizer")
            from llama2_jax.tokenizer import Tokenizer
            vocab = Tokenizer(tokenizer).vocab_size
        self.cfg = from_meta_params(params_path, vocab_size=vocab)

        self.files = self._shard_files()
        checklist = os.path.join(input_dir, META_CHECKLIST)
        if os.path.isfile(checklist) and not skip_checksum:
            verify_checklist(checklist, progress)
        self.shards = [_torch_load(f) for f in self.files]
        self._names = {(path, layer): name for path, layer, name in mapping.meta_names(self.cfg)}
        self._check()
        self.dtype = np.dtype(_TORCH_TO_NP[self.shards[0]["tok_embeddings.weight"].dtype])

    def _shard_files(self) -> list[str]:
        found = {}
        for path in glob.glob(os.path.join(self.dir, "consolidated.*.pth")):
            m = _SHARD.match(os.path.basename(path))
            if m:
                found[int(m.group(1))] = path
        if not found:
            raise SourceError(f"{self.dir}: no consolidated.NN.pth shard files")
        n = max(found) + 1
        missing = [f"consolidated.{i:02d}.pth" for i in range(n) if i not in found]
        if missing:
            raise SourceError(f"{self.dir}: shard file(s) {', '.join(missing)} missing "
                              f"(found {len(found)} of at least {n})")
        return [found[i] for i in range(n)]

    def _check(self) -> None:
        n = len(self.files)
        expected = set(self._names.values())
        for file, sd in zip(self.files, self.shards):
            check_names(file, dict.fromkeys(sd, file), expected, META_IGNORED)
        self._check_shard_count()
        for (path, _), name in self._names.items():
            try:
                want = mapping.meta_shard_shape(path, self.cfg, n)
            except ValueError as e:
                raise SourceError(f"{self.dir}: {n} shards contradict {META_PARAMS}: {e}") from None
            for file, sd in zip(self.files, self.shards):
                t = sd[name]
                check_tensor(file, name, t.shape, _TORCH_TO_NP.get(t.dtype), want,
                             f" from {META_PARAMS} split over {n} shard(s)")

    def _check_shard_count(self) -> None:
        """The embedding's share of the (replicated, so whole) model dim tells how many shards
        Meta wrote: name a missing or extra file rather than a puzzling shape."""
        dim = tuple(self.shards[0]["norm.weight"].shape)
        emb = tuple(self.shards[0]["tok_embeddings.weight"].shape)
        if dim != (self.cfg.dim,) or len(emb) != 2 or not emb[1] or self.cfg.dim % emb[1]:
            return  # a plain shape error follows
        written = self.cfg.dim // emb[1]
        if written != len(self.files):
            raise SourceError(
                f"{self.files[0]}: tok_embeddings.weight holds {emb[1]} of dim={self.cfg.dim} "
                f"columns, so the checkpoint was split into {written} shards, but "
                f"{len(self.files)} consolidated.NN.pth file(s) are present: is one missing?")

    def read(self, path, layer, dtype) -> np.ndarray:
        name = self._names[(path, layer)]
        return mapping.merge_meta_shards(path, [to_numpy(sd[name]) for sd in self.shards],
                                         self.cfg, dtype)


def verify_checklist(checklist: str, progress: bool = True) -> None:
    """Check the md5 sums Meta lists in `checklist.chk` ("<md5>  <file>" lines)."""
    folder = os.path.dirname(checklist)
    entries = []
    with open(checklist) as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not re.fullmatch(r"[0-9a-fA-F]{32}", parts[0]):
                raise SourceError(f"{checklist}: cannot parse line {line.strip()!r}")
            md5, name = parts[0].lower(), parts[1].lstrip("*")
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise SourceError(f"{checklist} lists {name}, which is missing")
            entries.append((path, md5))
    total = sum(os.path.getsize(p) for p, _ in entries)
    with tqdm(total=total, desc="md5    ", unit="B", unit_scale=True, unit_divisor=1024,
              disable=not progress, dynamic_ncols=True) as bar:
        for path, want in entries:
            h = hashlib.md5()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
                    bar.update(len(chunk))
            if h.hexdigest() != want:
                raise SourceError(f"{path}: md5 {h.hexdigest()} does not match {want} in "
                                  f"{checklist}: the file is corrupt or incomplete "
                                  "(pass --skip_checksum to convert it anyway)")


class HFSource(Source):
    """A Hugging Face LlamaForCausalLM directory: config.json + safetensors or .bin weights."""

    kind = "hf"

    def __init__(self, input_dir: str, *, tokenizer: str | None = None):
        self.dir = input_dir
        self.tokenizer = tokenizer
        config_path = os.path.join(input_dir, HF_CONFIG)
        if not os.path.isfile(config_path):
            raise SourceError(f"{input_dir}: no {HF_CONFIG}; is this a Hugging Face model "
                              "directory?")
        self.cfg = from_hf_config(config_path)
        with open(config_path) as f:
            self.tied = bool(json.load(f).get("tie_word_embeddings", False))
        files, weight_map = self._weight_files()
        self._open = {f: _open_weights(f) for f in files}
        self.files = files
        # tensor name -> (file, shape, numpy dtype or None)
        self._index = {}
        for file, handle in self._open.items():
            names = set(handle.names())
            if weight_map is not None:
                listed = {n for n, f in weight_map.items() if os.path.join(input_dir, f) == file}
                if names - listed:
                    raise SourceError(f"{file}: tensor(s) {_summary(names - listed)} are not in "
                                      "the index")
                if listed - names:
                    raise SourceError(f"{file}: missing tensor(s) {_summary(listed - names)} "
                                      "that the index places in it")
            for n in names:
                self._index[n] = (file, *handle.info(n))
        self._names = {}
        expected = {}
        for path, layer, name in mapping.hf_names(self.cfg):
            if name == "lm_head.weight" and self.tied:
                name = "model.embed_tokens.weight"
            self._names[(path, layer)] = name
            expected[name] = path
        ignored = {n for n in self._index if _HF_IGNORED.match(n)}
        if self.tied:
            ignored.add("lm_head.weight")  # HF ties it to the embeddings whatever the file holds
        check_names(self.dir, {n: v[0] for n, v in self._index.items()}, expected,
                    ignored)
        for name, path in expected.items():
            file, shape, dtype = self._index[name]
            check_tensor(file, name, shape, dtype, mapping.torch_shape(path, self.cfg),
                         f" from {HF_CONFIG}")
        self.dtype = np.dtype(self._index["model.embed_tokens.weight"][2])

    def _weight_files(self) -> tuple[list[str], dict[str, str] | None]:
        """The weight files, and the index's tensor name -> file map (None without index)."""
        for index in HF_INDEXES:
            path = os.path.join(self.dir, index)
            if os.path.isfile(path):
                try:
                    with open(path) as f:
                        weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise SourceError(f"{path}: not a weight index ({e!r})") from None
                files = sorted(set(weight_map.values()))
                for file in files:
                    if not os.path.isfile(os.path.join(self.dir, file)):
                        raise SourceError(f"{path} lists {file}, which is missing")
                return [os.path.join(self.dir, f) for f in files], weight_map
        for single in HF_SINGLE:
            path = os.path.join(self.dir, single)
            if os.path.isfile(path):
                return [path], None
        raise SourceError(f"{self.dir}: no weights found (looked for "
                          f"{', '.join(HF_INDEXES + HF_SINGLE)})")

    def read(self, path, layer, dtype) -> np.ndarray:
        name = self._names[(path, layer)]
        file = self._index[name][0]
        return mapping.hf_to_jax(path, to_numpy(self._open[file].get(name)), self.cfg, dtype)


class _Safetensors:
    def __init__(self, path: str):
        from safetensors import safe_open
        self.path = path
        try:
            self.f = safe_open(path, framework="pt")
        except Exception as e:  # SafetensorError: truncated, bad header
            raise SourceError(f"{path}: cannot read as safetensors, truncated or corrupt? "
                              f"({e})") from None

    def names(self) -> list[str]:
        return list(self.f.keys())

    def info(self, name):
        s = self.f.get_slice(name)
        return tuple(s.get_shape()), _ST_TO_NP.get(s.get_dtype())

    def get(self, name) -> torch.Tensor:
        return self.f.get_tensor(name)


class _TorchBin:
    def __init__(self, path: str):
        self.sd = _torch_load(path)

    def names(self) -> list[str]:
        return list(self.sd)

    def info(self, name):
        t = self.sd[name]
        return tuple(t.shape), _TORCH_TO_NP.get(t.dtype)

    def get(self, name) -> torch.Tensor:
        return self.sd[name]


def _open_weights(path: str):
    return _Safetensors(path) if path.endswith(".safetensors") else _TorchBin(path)
