"""From an app's config to its model and tokenizer: what the chat and the server share.

`prepare(config)` checks every model setting (dtype, quantization, mesh, checkpoint, tokenizer)
before any weight is read, so a bad setting fails in a second with one line; `Prepared.load()`
then reads (or makes) the weights on the mesh. The server calls the two apart: it answers
/health while `load` runs on its device thread.

The config fields read here are the ones `model_fields` defines; the chat and serve configs
start from them.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
from typing import TextIO

import jax
import ml_collections
from jax.sharding import Mesh

from llama2_jax import checkpoint, cli, quant, sharding
from llama2_jax.checkpoint import CheckpointError
from llama2_jax.config import DTYPES, ConfigError, ModelConfig
from llama2_jax.engine import ContextError
from llama2_jax.model import Transformer, param_count
from llama2_jax.sharding import ShardingError
from llama2_jax.tokenizer import DialogError, Tokenizer


class SettingsError(ValueError):
    """An app setting that cannot work; the message says which and why."""


# Errors caused by the user's settings or input: reported as one line, never a traceback.
USER_ERRORS = (SettingsError, CheckpointError, ConfigError, ContextError, DialogError,
               ShardingError, FileNotFoundError)


def model_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Add the model settings every app has to `c` (with their defaults); returns `c`."""
    c.checkpoint_dir = ""  # converted checkpoint; "" = random weights (model_preset + model)
    c.tokenizer_path = ""  # "" = <checkpoint_dir>/tokenizer.model
    # A fine-tuning config (configs/sft_*.py) whose `<output_dir>/final` is checkpoint_dir:
    # when that checkpoint does not exist yet, it is trained first (the demo's model).
    c.train_config = ""
    c.model_preset = ""  # llama2_jax.config.PRESETS name, for random weights only
    c.model = ml_collections.ConfigDict()  # ModelConfig fields over the preset (random only)
    c.dtype = ""  # "" = bfloat16 on accelerators, float32 on CPU
    # 8-bit weights: none | int8 | fp8, quantized while loading; "" = as the checkpoint
    # stores them (a converter's --quantization), so a quantized checkpoint stays quantized.
    c.quantization = ""
    # Mesh sizes, -1 = the devices left. Tensor parallelism is the fastest for one
    # conversation but must divide the heads; FSDP works with any device count.
    c.data = 1
    c.fsdp = 1
    c.tensor = -1
    c.multihost = False  # jax.distributed.initialize(); process 0 reads input and prints
    c.seed = 0  # also the seed of random weights
    c.context_length = 0  # 0 = the model's max_seq_len
    # Compiled steps persist here, so the next start skips XLA compilation (minutes for 70B
    # on some backends). "" = off.
    c.compilation_cache_dir = "~/.cache/llama2_jax/xla"
    return c


@dataclasses.dataclass
class Prepared:
    """Checked settings of a model that is not loaded yet."""

    model_config: ModelConfig  # as the checkpoint (or the preset) says, before the dtype
    tokenizer: Tokenizer
    mesh: Mesh
    dtype: str
    quantization: str  # "" = as stored
    checkpoint_dir: str  # "" = random weights
    seed: int

    @property
    def source(self) -> str:
        return self.checkpoint_dir or "random weights"

    def load(self, err: TextIO | None = None) -> Transformer:
        """The model on `mesh`: restored from the checkpoint, or random (then quantized)."""
        if self.checkpoint_dir:
            if err is not None:
                err.write(f"loading {self.checkpoint_dir} ...\n")
                err.flush()
            return checkpoint.load(self.checkpoint_dir, mesh=self.mesh, dtype=self.dtype,
                                   quantization=self.quantization or None)
        model = checkpoint.random_model(self.model_config.with_dtype(self.dtype), self.mesh,
                                        seed=self.seed)
        return quant.quantize_model(model, self.quantization or "none")


def context_length(model_cfg: ModelConfig, requested: int) -> int:
    """The context an app runs in: `requested`, 0 = the model's max_seq_len."""
    length = requested or model_cfg.max_seq_len
    if not 0 < length <= model_cfg.max_seq_len:
        raise SettingsError(f"context_length={requested} must be 0 (the model's) or in "
                            f"1..{model_cfg.max_seq_len}, the model's max_seq_len")
    return length


def prepare(config: ml_collections.ConfigDict, err: TextIO) -> Prepared:
    """Check the model settings of `config` (see `model_fields`); nothing is loaded.

    Trains the demo's model first when `train_config` says so. Raises one of USER_ERRORS.
    """
    dtype = config.dtype or checkpoint.default_dtype()
    if dtype not in DTYPES:
        raise SettingsError(f"dtype={config.dtype!r}: expected one of {', '.join(DTYPES)} or "
                            "'' (bfloat16 on accelerators, float32 on CPU)")
    if config.quantization:
        quant.check_method(config.quantization)
    mesh = sharding.make_mesh(config.data, config.fsdp, config.tensor)
    checkpoint_dir = os.path.expanduser(config.checkpoint_dir)
    if checkpoint_dir and config.train_config and not os.path.isdir(checkpoint_dir):
        train_first(config.train_config, checkpoint_dir, err)
    if checkpoint_dir:
        if not os.path.isdir(checkpoint_dir):
            raise CheckpointError(
                f"checkpoint directory not found: {checkpoint_dir} (convert weights there "
                "with convert/meta_to_orbax.py or convert/hf_to_orbax.py, or set "
                "--config.checkpoint_dir)")
        model_cfg = checkpoint.read_config(checkpoint_dir)
        tokenizer_path = config.tokenizer_path or os.path.join(checkpoint_dir,
                                                               checkpoint.TOKENIZER_FILE)
    else:
        model_cfg = cli.random_config(config)
        if not config.tokenizer_path:
            raise SettingsError("tokenizer_path is required when checkpoint_dir is empty")
        tokenizer_path = config.tokenizer_path
    tokenizer = load_tokenizer(tokenizer_path)
    check_vocab(tokenizer, model_cfg)
    sharding.check_mesh(mesh, model_cfg.n_heads, model_cfg.n_kv_heads)
    return Prepared(model_cfg, tokenizer, mesh, dtype, config.quantization, checkpoint_dir,
                    config.seed)


def check_vocab(tokenizer: Tokenizer, model_cfg: ModelConfig) -> None:
    if tokenizer.vocab_size != model_cfg.vocab_size:
        raise SettingsError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but "
                            f"the model's vocab_size is {model_cfg.vocab_size}")


def load_tokenizer(path: str) -> Tokenizer:
    try:
        return Tokenizer(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; set --config.tokenizer_path to Llama 2's "
                                "tokenizer.model") from None
    except ValueError as e:  # not a SentencePiece model
        raise SettingsError(str(e)) from None


def train_first(train_config: str, checkpoint_dir: str, err: TextIO) -> None:
    """Fine-tune `checkpoint_dir` with the SFT config file `train_config`, once.

    Several apps started at once wait for one training run (a lock beside the run's
    directory); an interrupted training resumes at the next start.
    """
    from llama2_jax import finetune  # the demo's model is made by the fine-tuning app

    sft = cli.load_config_file(train_config)
    final = os.path.join(os.path.expanduser(sft.output_dir), finetune.FINAL_DIR)
    if os.path.abspath(final) != os.path.abspath(checkpoint_dir):
        return  # another checkpoint was asked for: it must exist (reported by the caller)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    with open(os.path.dirname(final) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(final):
            return  # trained by an app that held the lock before us
        err.write(f"{checkpoint_dir} does not exist yet: training it with {train_config} "
                  f"(once; about 1.5 minutes on a 2-core CPU) ...\n")
        err.flush()
        try:
            finetune.train(sft, err)
        except finetune.USER_ERRORS as e:
            raise SettingsError(f"training {checkpoint_dir} with {train_config} failed: "
                                f"{e}") from None


def banner(app: str, model: Transformer, source: str, mesh: Mesh, length: int) -> str:
    c = model.config
    device = mesh.devices.flat[0]
    return (f"llama2_jax {app}: {source}\n"
            f"  {_count(param_count(model))} parameters: dim {c.dim}, {c.n_layers} layers, "
            f"{c.n_heads} heads ({c.n_kv_heads} KV), ffn {c.ffn_dim}, vocab {c.vocab_size}; "
            f"context {length}, {c.dtype}, weights {quant.method_of(checkpoint.params_of(model))}"
            f"\n  mesh {', '.join(f'{k}={v}' for k, v in mesh.shape.items())} over {mesh.size} x "
            f"{device.device_kind} in {jax.process_count()} process(es)\n")


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)
