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

from llama2_jax.model import checkpoint, quant, sharding
from llama2_jax import cli, distributed, plan
from llama2_jax.model.checkpoint import CheckpointError
from llama2_jax.model.config import DTYPES, ConfigError, ModelConfig
from llama2_jax.inference.generate import ContextError
from llama2_jax.model.transformer import Transformer, param_count
from llama2_jax.model.sharding import ShardingError
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
    c.model_preset = ""  # llama2_jax.model.config.PRESETS name, for random weights only
    c.model = ml_collections.ConfigDict()  # ModelConfig fields over the preset (random only)
    c.dtype = ""  # "" = bfloat16 on accelerators, float32 on CPU
    # 8-bit weights: none | int8 | fp8, quantized while loading; "" = as the checkpoint
    # stores them (a converter's --quantization), so a quantized checkpoint stays quantized.
    c.quantization = ""
    # FP8 weights multiply FP8 activations (FP8 matmul hardware: Hopper, Ada); off: weight-only.
    c.native_fp8 = False
    # Mesh sizes, -1 = the devices left. Tensor parallelism is the fastest for one
    # conversation but must divide the heads; FSDP works with any device count.
    c.data = 1
    c.fsdp = 1
    c.tensor = -1
    # "auto": the planner (llama2_jax.plan) picks the mesh, and with quantization="auto" the
    # weight format, that fit the devices present; "" = the data / fsdp / tensor sizes above.
    c.mesh = ""
    distributed.fields(c)  # multihost, coordinator_address, num_processes, process_id, ...
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
    native_fp8: bool = False

    @property
    def source(self) -> str:
        return self.checkpoint_dir or "random weights"

    def load(self, err: TextIO | None = None) -> Transformer:
        """The model on `mesh`: restored from the checkpoint, or random (then quantized)."""
        if self.checkpoint_dir:
            if err is not None:
                err.write(f"loading {self.checkpoint_dir} ...\n")
                err.flush()
            model = checkpoint.load(self.checkpoint_dir, mesh=self.mesh, dtype=self.dtype,
                                    quantization=self.quantization or None)
        else:
            model = quant.quantize_model(
                checkpoint.random_model(self.model_config.with_dtype(self.dtype), self.mesh,
                                        seed=self.seed), self.quantization or "none")
        return quant.use_native_fp8(model, True) if self.native_fp8 else model


def context_length(model_cfg: ModelConfig, requested: int) -> int:
    """The context an app runs in: `requested`, 0 = the model's max_seq_len."""
    length = requested or model_cfg.max_seq_len
    if not 0 < length <= model_cfg.max_seq_len:
        raise SettingsError(f"context_length={requested} must be 0 (the model's) or in "
                            f"1..{model_cfg.max_seq_len}, the model's max_seq_len")
    return length


def prepare(config: ml_collections.ConfigDict, err: TextIO, app: str = "chat") -> Prepared:
    """Check the model settings of `config` (see `model_fields`; a fine-tuning config has
    them too) for `app` (chat, serve or finetune); nothing is loaded. The one way every app,
    and the notebook, turns a config into a model config, tokenizer, mesh and weight format.

    Trains the demo's model first when `train_config` says so. The mesh and quantization are
    the planner's (llama2_jax.plan) where they are "auto", and the ones given otherwise, which
    must fit the devices present. Raises one of USER_ERRORS.
    """
    dtype = config.dtype or checkpoint.default_dtype()
    if dtype not in DTYPES:
        raise SettingsError(f"dtype={config.dtype!r}: expected one of {', '.join(DTYPES)} or "
                            "'' (bfloat16 on accelerators, float32 on CPU)")
    if config.quantization not in ("", "auto"):
        quant.check_method(config.quantization)
    mesh = explicit_mesh(config)
    checkpoint_dir = os.path.expanduser(config.checkpoint_dir)
    train_config = config.get("train_config", "")  # the demo's (chat and serve configs)
    if checkpoint_dir and train_config and not os.path.isdir(checkpoint_dir):
        train_first(train_config, checkpoint_dir, err)
    stored = "none"
    if checkpoint_dir:
        if not os.path.isdir(checkpoint_dir):
            raise CheckpointError(
                f"checkpoint directory not found: {checkpoint_dir} (convert weights there "
                "with convert/meta_to_orbax.py or convert/hf_to_orbax.py, or set "
                "--config.checkpoint_dir)")
        model_cfg, stored = checkpoint.read_meta(checkpoint_dir)
        tokenizer_path = config.tokenizer_path or os.path.join(checkpoint_dir,
                                                               checkpoint.TOKENIZER_FILE)
    else:
        model_cfg = cli.random_config(config)
        if not config.tokenizer_path:
            raise SettingsError("tokenizer_path is required when checkpoint_dir is empty")
        tokenizer_path = config.tokenizer_path
    tokenizer = load_tokenizer(tokenizer_path)
    check_vocab(tokenizer, model_cfg)
    if mesh is not None:
        sharding.check_mesh(mesh, model_cfg.n_heads, model_cfg.n_kv_heads)
    mesh, quantization = fit_devices(config, model_cfg, app, dtype, stored, mesh, err)
    return Prepared(model_cfg, tokenizer, mesh, dtype, quantization, checkpoint_dir,
                    config.seed, bool(config.get("native_fp8", False)))


def explicit_mesh(config: ml_collections.ConfigDict) -> Mesh | None:
    """The mesh of `config`'s data / fsdp / tensor sizes; None when `mesh` is "auto"."""
    if config.mesh == "auto":
        return None
    if config.mesh:
        raise SettingsError(f"mesh={config.mesh!r}: expected 'auto' (the planner picks) or '' "
                            "(the data, fsdp and tensor settings)")
    return sharding.make_mesh(config.data, config.fsdp, config.tensor)


def fit_devices(config: ml_collections.ConfigDict, model_cfg: ModelConfig, app: str,
                dtype: str, stored: str, mesh: Mesh | None,
                err: TextIO) -> tuple[Mesh, str]:
    """The mesh and quantization `app` runs with: `mesh` (None = the planner's) and
    `config.quantization` ("auto" = the planner's; "" = as `stored`), checked against the
    devices present by llama2_jax.plan. Raises SettingsError, with the planner's numbers,
    when they do not fit."""
    wanted = config.quantization
    if wanted == "auto":
        # A quantized checkpoint stays so; full fine-tuning trains unquantized weights.
        quantization = stored if stored != "none" else "auto"
    else:
        quantization = wanted or stored
    task = plan.task_of(config, app)
    if task.name == "sft" and wanted == "auto":
        quantization = "none"
    devices = plan.present_devices()
    fixed = None
    if mesh is not None:
        devices = dataclasses.replace(devices, count=mesh.size)
        fixed = {axis: int(size) for axis, size in mesh.shape.items()}
    name = os.path.basename(os.path.normpath(config.checkpoint_dir)) if config.checkpoint_dir \
        else (config.model_preset or "random model")
    try:
        p = plan.make_plan(model_cfg, task, devices, model=name, quantization=quantization,
                           mesh=fixed, dtype=dtype)
    except plan.PlanError as e:
        raise SettingsError(str(e)) from None
    if not p.fits:
        raise SettingsError(f"{p.notes[-1]} (python -m llama2_jax.plan prints the table)")
    if mesh is None:
        mesh = sharding.make_mesh(p.mesh["data"], p.mesh["fsdp"], p.mesh["tensor"])
    if fixed is None or wanted == "auto":
        err.write(f"plan: mesh {', '.join(f'{k}={v}' for k, v in p.mesh.items())}, "
                  f"quantization {p.quantization}: {plan.gb(p.total)} of "
                  f"{plan.gb(p.usable)} per device ({devices.kind})\n")
    return mesh, p.quantization if wanted == "auto" else wanted


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
