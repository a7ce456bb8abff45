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
import os
from typing import TextIO

import jax
import ml_collections
from jax.sharding import Mesh

from llama2_jax.model import checkpoint, kv_cache, quant, sharding
from llama2_jax import cli, distributed, plan
from llama2_jax.model.checkpoint import CheckpointError
from llama2_jax.model.config import DTYPES, ConfigError, ModelConfig
from llama2_jax.distributed import DistributedError
from llama2_jax.inference.adapters import Limits, limits_for
from llama2_jax.inference.requests import ContextError
from llama2_jax.model.adapter import AdapterError
from llama2_jax.model.transformer import Transformer, param_count
from llama2_jax.model.sharding import ShardingError
from llama2_jax.tokenizer import DialogError, Tokenizer
from llama2_jax.training.data import DataError
from llama2_jax.training.trainer import FinetuneError


class SettingsError(ValueError):
    """An app setting that cannot work; the message says which and why."""


# Errors caused by the user's settings or input, in every app: reported as one line, never a
# traceback.
USER_ERRORS = (SettingsError, CheckpointError, ConfigError, ContextError, DialogError,
               ShardingError, DistributedError, DataError, FinetuneError, FileNotFoundError)


def model_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Add the model settings every app has (chat, serve, finetune) to `c`, with their
    defaults; returns `c`. The apps' base configs start from these."""
    c.checkpoint_dir = ""  # converted checkpoint; "" = random weights (model_preset + model)
    c.tokenizer_path = ""  # "" = <checkpoint_dir>/tokenizer.model
    c.model_preset = ""  # llama2_jax.model.config.PRESETS name, for random weights only
    c.model = ml_collections.ConfigDict()  # ModelConfig fields over the preset (random only)
    c.dtype = ""  # "" = bfloat16 on accelerators, float32 on CPU
    # Weight format: none | int8 | fp8 (quantized while loading); "" = as the checkpoint
    # stores them (a converter's --quantization), so a quantized checkpoint stays quantized;
    # "auto" = as stored if quantized, else the planner's choice for the devices present.
    c.quantization = checkpoint.AS_STORED
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
    # Compiled steps persist here, so the next start skips XLA compilation (minutes for 70B
    # on some backends). "" = off.
    c.compilation_cache_dir = "~/.cache/llama2_jax/xla"
    return c


def inference_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`model_fields` and what the inference apps (chat, serve) add to them; returns `c`."""
    model_fields(c)
    # A fine-tuning config (configs/sft_*.py) whose `<output_dir>/final` is checkpoint_dir:
    # when that checkpoint does not exist yet, it is trained first (the demo's model, see
    # llama2_jax.demo).
    c.train_config = ""
    # FP8 weights multiply FP8 activations (FP8 matmul hardware: Hopper, Ada); off: weight-only.
    c.native_fp8 = False
    c.context_length = 0  # 0 = the model's max_seq_len
    # The KV cache's format: none (the compute dtype) | int8 | fp8 (e4m3): 8 bits and a
    # float32 scale per position and KV head, a quarter (fp32) or half (bf16) of the bytes.
    c.kv_quantization = "none"
    return c


def adapter_list(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """(name, directory) of each adapter in a serve config's `adapters` ("name=dir,...");
    SettingsError for a bad one."""
    out: list[tuple[str, str]] = []
    for item in filter(None, (x.strip() for x in config.adapters.split(","))):
        name, sep, path = (x.strip() for x in item.partition("="))
        if not sep or not name or not path:
            raise SettingsError(f"adapters: {item!r} is not name=directory")
        if name in {n for n, _ in out}:
            raise SettingsError(f"adapters: the name {name!r} is used twice")
        out.append((name, os.path.abspath(os.path.expanduser(path))))
    return out


def adapter_limits(config: ml_collections.ConfigDict) -> Limits | None:
    """The room for adapters the settings ask for (None: no adapters); reads the adapters'
    metadata (AdapterError names a bad directory)."""
    listed = [d for _, d in adapter_list(config)]
    if not listed and not config.max_loras:
        return None
    targets = tuple(t.strip() for t in config.lora_targets.split(",") if t.strip())
    try:
        limits = limits_for(listed, config.max_loras, config.max_lora_rank, targets)
    except AdapterError:
        raise
    except ValueError as e:
        raise SettingsError(f"max_loras / max_lora_rank / lora_targets: {e}") from None
    if len(listed) > limits.max_adapters:
        raise SettingsError(f"adapters lists {len(listed)} adapters, over max_loras="
                            f"{limits.max_adapters}")
    return limits


def task_of(config: ml_collections.ConfigDict, app: str) -> plan.Task:
    """The planner's Task for an app's config (configs/*.py): app chat, serve or finetune."""
    if app == "serve":
        limits = adapter_limits(config)
        return plan.Task("serve", context=config.context_length, slots=config.max_slots,
                         prefill_chunk=config.prefill_chunk,
                         kv_quantization=kv_method(config),
                         prefix_cache_mb=config.prefix_cache_mb,
                         **({} if limits is None else dict(
                             max_loras=limits.max_adapters, lora_rank=limits.max_rank,
                             lora_targets=limits.targets)))
    if app == "finetune":
        lora = config.lora.rank > 0
        return plan.Task("lora" if lora else "sft", batch=config.batch_size // config.grad_accum,
                         seq_len=config.seq_len, lora_rank=config.lora.rank,
                         lora_targets=tuple(config.lora.targets), remat=config.remat,
                         param_dtype=config.param_dtype, grad_accum=config.grad_accum)
    return plan.Task("chat", context=config.context_length, kv_quantization=kv_method(config))


def kv_method(config: ml_collections.ConfigDict) -> str:
    """The inference config's kv_quantization, checked."""
    method = config.get("kv_quantization", "none")
    if method not in kv_cache.KV_METHODS:
        raise SettingsError(f"kv_quantization={method!r}: expected one of "
                            f"{', '.join(kv_cache.KV_METHODS)}")
    return method


@dataclasses.dataclass
class Prepared:
    """Checked settings of a model that is not loaded yet."""

    model_config: ModelConfig  # as the checkpoint (or the preset) says, before the dtype
    tokenizer: Tokenizer
    mesh: Mesh
    dtype: str
    quantization: str  # none | int8 | fp8, resolved (never "as stored" or "auto")
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
                                    quantization=self.quantization)
        else:
            model = quant.quantize_model(
                checkpoint.random_model(self.model_config.with_dtype(self.dtype), self.mesh,
                                        seed=self.seed), self.quantization)
        return quant.use_native_fp8(model, True) if self.native_fp8 else model


def context_length(model_cfg: ModelConfig, requested: int) -> int:
    """The context an app runs in: `requested`, 0 = the model's max_seq_len."""
    length = requested or model_cfg.max_seq_len
    if not 0 < length <= model_cfg.max_seq_len:
        raise SettingsError(f"context_length={requested} must be 0 (the model's) or in "
                            f"1..{model_cfg.max_seq_len}, the model's max_seq_len")
    return length


def prepare(config: ml_collections.ConfigDict, err: TextIO, app: str = "chat") -> Prepared:
    """Check the model settings of `config` (see `model_fields`) for `app` (chat, serve or
    finetune); nothing is loaded. The one way every app, and the notebook, turns a config into
    a model config, tokenizer, mesh, dtype and weight format.

    The dtype, mesh and quantization are resolved once, by llama2_jax.plan.make_plan, against
    the devices present: "auto" settings are the planner's choice, explicit ones must fit.
    A demo config's model is trained before this (llama2_jax.demo). Raises one of
    USER_ERRORS.
    """
    if config.dtype and config.dtype not in DTYPES:
        raise SettingsError(f"dtype={config.dtype!r}: expected one of {', '.join(DTYPES)} or "
                            "'' (bfloat16 on accelerators, float32 on CPU)")
    if config.quantization not in (checkpoint.AS_STORED, "auto"):
        quant.check_method(config.quantization)
    mesh = explicit_mesh(config)
    checkpoint_dir = os.path.expanduser(config.checkpoint_dir)
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
    p = fit_devices(config, model_cfg, app, stored, mesh, err)
    if mesh is None:
        mesh = sharding.make_mesh(p.mesh["data"], p.mesh["fsdp"], p.mesh["tensor"])
    return Prepared(model_cfg, tokenizer, mesh, p.dtype, p.quantization, checkpoint_dir,
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
                stored: str, mesh: Mesh | None, err: TextIO) -> plan.Plan:
    """The plan `app` runs with (dtype, mesh, quantization), resolved by plan.make_plan
    from `config` and the checkpoint's `stored` format for the devices present (`mesh`, if
    given, fixes the mesh). Raises SettingsError, with the planner's numbers, when it does not
    fit."""
    devices = plan.present_devices()
    fixed = None
    if mesh is not None:
        devices = dataclasses.replace(devices, count=mesh.size)
        fixed = {axis: int(size) for axis, size in mesh.shape.items()}
    name = os.path.basename(os.path.normpath(config.checkpoint_dir)) if config.checkpoint_dir \
        else (config.model_preset or "random model")
    try:
        p = plan.make_plan(model_cfg, task_of(config, app), devices, stored=stored,
                         quantization=config.quantization, dtype=config.dtype, mesh=fixed,
                         model=name)
    except plan.PlanError as e:
        raise SettingsError(str(e)) from None
    if not p.fits:
        raise SettingsError(f"{p.notes[-1]} (python -m llama2_jax.plan prints the table)")
    if fixed is None or config.quantization == "auto":
        err.write(f"plan: mesh {', '.join(f'{k}={v}' for k, v in p.mesh.items())}, "
                  f"quantization {p.quantization}: {plan.gb(p.total)} of "
                  f"{plan.gb(p.usable)} per device ({devices.kind})\n")
    return p


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
