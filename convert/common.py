"""Pieces every converter shares: the staged output directory, progress, dtype and tokenizer."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import time
import uuid

import ml_dtypes  # noqa: F401  (makes np.dtype("bfloat16") known to numpy)
import numpy as np
from absl import flags, logging
from tqdm import tqdm

from llama2_jax.model import checkpoint, quant
from llama2_jax.model.config import DTYPES  # noqa: F401  (the one list; converters' --dtype)

TOKENIZER_FILE = "tokenizer.model"


class ConversionError(ValueError):
    """An input the converters refuse, or an output they will not overwrite."""


def define_import_flags(input_help: str, verify_help: str) -> None:
    """The flags meta_to_orbax.py and hf_to_orbax.py share (defined by each script's __main__,
    so that tests can import several converters)."""
    flags.DEFINE_string("input_dir", None, input_help)
    flags.DEFINE_string("output_dir", None, "Checkpoint directory to create.")
    flags.DEFINE_enum("dtype", None, list(DTYPES),
                      "Weight dtype to write (default: the source's; bfloat16 for Llama 2).")
    flags.DEFINE_string("tokenizer", None, "tokenizer.model to copy in (default: the one in "
                        "input_dir or its parent, if any).")
    flags.DEFINE_enum("quantization", "none", list(quant.METHODS),
                      "Write the projection weights quantized (int8/fp8: 8 bits and a float32 "
                      "scale per output channel; int4: 4 bits and a scale per group of 128 "
                      "inputs and output channel; embeddings and norms keep --dtype).")
    flags.DEFINE_bool("overwrite", False, "Replace output_dir if it exists.")
    flags.DEFINE_bool("verify", False, "Compare the converted model's logits with Hugging Face "
                      f"transformers on {verify_help} (needs ~8 bytes/parameter of RAM).")
    flags.DEFINE_bool("progress", True, "Show progress bars.")
    flags.mark_flags_as_required(["input_dir", "output_dir"])


def quiet_logs() -> None:
    """Orbax logs every step at INFO: show warnings and up unless --verbosity was given."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def output_dtype(flag: str | None, source_dtype) -> np.dtype:
    """The dtype weights are written in: `flag` if given, else the source's (bf16 stays bf16)."""
    name = flag or np.dtype(source_dtype).name
    if name not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return np.dtype(name)


def find_tokenizer(input_dir: str, flag: str | None) -> str | None:
    """`flag` if given, else a tokenizer.model in `input_dir` or its parent (Meta's downloads
    keep it one level above the weights)."""
    if flag:
        if not os.path.isfile(flag):
            raise ConversionError(f"--tokenizer: file not found: {flag}")
        return flag
    for d in (input_dir, os.path.dirname(os.path.abspath(input_dir))):
        path = os.path.join(d, TOKENIZER_FILE)
        if os.path.isfile(path):
            return path
    return None


def check_verify(verify_logits: bool, quantization: str) -> None:
    """--verify checks for an exact conversion; quantized weights are not one."""
    if verify_logits and quantization != "none":
        raise ConversionError("--verify checks exact conversions: it does not apply with "
                              "--quantization (benchmarks/quant_quality.py measures quantized "
                              "models)")


def check_output(output_dir: str, overwrite: bool) -> None:
    if os.path.exists(output_dir) and not overwrite:
        raise ConversionError(f"{output_dir} already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def staged_output(output_dir: str, overwrite: bool):
    """Yield a fresh temporary sibling of `output_dir`; rename it into place on success.

    Whatever happens before the rename (an error, SIGKILL), `output_dir` is untouched: absent or
    the previous complete output. Temporaries of killed runs are removed at the next start.
    """
    output_dir = os.path.abspath(output_dir)
    check_output(output_dir, overwrite)
    parent, base = os.path.split(output_dir)
    os.makedirs(parent, exist_ok=True)
    _remove_stale(parent, base)
    tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
        checkpoint.replace_dir(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale(parent: str, base: str) -> None:
    """Delete `.{base}.tmp-PID-*` directories whose process is gone."""
    prefix = f".{base}.tmp-"
    for name in os.listdir(parent):
        if not name.startswith(prefix):
            continue
        try:
            pid = int(name[len(prefix):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        except (ValueError, PermissionError):
            pass  # not ours, or another user's live process


@dataclasses.dataclass
class Progress:
    """Two tqdm bars (tensors, bytes) and the totals for the final summary."""

    n_tensors: int
    n_bytes: int
    enabled: bool = True
    start: float | None = None  # time.perf_counter() the run began (default: now)

    def __post_init__(self):
        self.start = self.start or time.perf_counter()
        self.params = 0
        self.bytes = 0
        kw = dict(disable=not self.enabled, file=sys.stderr, dynamic_ncols=True)
        self._tensors = tqdm(total=self.n_tensors, desc="tensors", unit="t", position=0, **kw)
        self._bytes = tqdm(total=self.n_bytes, desc="bytes  ", unit="B", unit_scale=True,
                           unit_divisor=1024, position=1, **kw)

    def add(self, params: int, nbytes: int, tensors: int) -> None:
        self.params += params
        self.bytes += nbytes
        self._bytes.update(nbytes)
        self._tensors.update(tensors)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self._tensors.close()
        self._bytes.close()

    def summary(self, what: str, output_dir: str) -> str:
        line = (f"{what}: {self.params:,} parameters, {self.bytes / 2**30:.2f} GiB written, "
                f"{time.perf_counter() - self.start:.1f} s -> {output_dir}")
        print(line, flush=True)
        return line
