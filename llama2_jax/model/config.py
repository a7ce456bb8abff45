"""Model architecture: a frozen dataclass, presets, and readers for Meta/HF config files."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp

DTYPES = ("float32", "bfloat16", "float16")  # every dtype a model computes or stores in


class ConfigError(ValueError):
    """A model configuration that cannot describe a Llama 2 model."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Llama 2 architecture plus the dtypes it is run in.

    `dtype` is the compute dtype (activations, matmul inputs); `param_dtype` the dtype weights
    are stored in. RMSNorm statistics, softmax and logits are always float32.
    """

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    ffn_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ConfigError(
                f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if (self.dim // self.n_heads) % 2:
            raise ConfigError(
                f"head dim dim/n_heads = {self.dim // self.n_heads} must be even for RoPE")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(
                    f"{name} must be one of {', '.join(DTYPES)}, got {getattr(self, name)!r}")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def with_dtype(self, dtype: str | None) -> "ModelConfig":
        """Both compute and parameter dtype set to `dtype` (None keeps the config's)."""
        if dtype is None:
            return self
        return self.replace(dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(dtype).name)

    def num_params(self) -> int:
        d, f, h = self.dim, self.ffn_dim, self.head_dim
        attn = d * self.n_heads * h * 2 + d * self.n_kv_heads * h * 2
        layer = attn + 3 * d * f + 2 * d
        return self.n_layers * layer + 2 * self.vocab_size * d + d

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(
                f"{source}: unknown field(s) {unknown}; valid fields: {sorted(fields)}")
        return cls(**data)


def ffn_dim_from_meta(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """FFN width exactly as Meta's `FeedForward.__init__` computes it."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def from_meta_params(params: Mapping[str, Any] | str | os.PathLike,
                     vocab_size: int | None = None, **overrides) -> ModelConfig:
    """Config from Meta's `params.json` (a dict or a path).

    `vocab_size: -1` in the file means "take it from the tokenizer": pass `vocab_size` then.
    """
    source = "params.json"
    if not isinstance(params, Mapping):
        source = os.fspath(params)
        params = _read_json(source)
    known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
             "ffn_dim_multiplier", "norm_eps", "rope_theta", "max_seq_len", "max_batch_size"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"{source}: unexpected key(s) {unknown}; known keys: {sorted(known)}")
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise ConfigError(f"{source}: missing required key '{key}'")
    vocab = params.get("vocab_size", -1)
    if vocab is None or vocab == -1:
        if vocab_size is None:
            raise ConfigError(
                f"{source}: vocab_size is {vocab}, which means 'from the tokenizer'; "
                "pass vocab_size= (the tokenizer's piece count)")
        vocab = vocab_size
    dim = params["dim"]
    kwargs = dict(
        vocab_size=vocab,
        dim=dim,
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
        ffn_dim=ffn_dim_from_meta(dim, params.get("multiple_of", 256),
                                  params.get("ffn_dim_multiplier")),
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 10000.0),
    )
    kwargs.update(overrides)
    return _build(kwargs, source)


def from_hf_config(config: Mapping[str, Any] | str | os.PathLike, **overrides) -> ModelConfig:
    """Config from a Hugging Face `config.json` of a `LlamaForCausalLM` (a dict or a path)."""
    source = "config.json"
    if not isinstance(config, Mapping):
        source = os.fspath(config)
        config = _read_json(source)
    model_type = config.get("model_type", "llama")
    if model_type != "llama":
        raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'llama'")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "vocab_size"):
        if key not in config:
            raise ConfigError(f"{source}: missing required key '{key}'")
    if config.get("rope_scaling"):
        raise ConfigError(f"{source}: rope_scaling={config['rope_scaling']!r} is not Llama 2; "
                          "only plain RoPE is supported")
    theta = config.get("rope_theta")
    if theta is None:  # transformers >= 5 keeps it under rope_parameters
        theta = (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    kwargs = dict(
        vocab_size=config["vocab_size"],
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        ffn_dim=config["intermediate_size"],
        norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=float(theta),
        max_seq_len=config.get("max_position_embeddings", 4096),
    )
    kwargs.update(overrides)
    return _build(kwargs, source)


def _build(kwargs: dict, source: str) -> ModelConfig:
    try:
        return ModelConfig(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


LLAMA2_7B = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008)
LLAMA2_13B = ModelConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824)
LLAMA2_70B = ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672)
# Test-sized models: the same code paths, compiled in seconds on a CPU.
TINY = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=128,
                   max_seq_len=256)
TINY_GQA = TINY.replace(n_kv_heads=2)
# The ~134M model of the benchmarks: Llama-2-shaped, small enough for a 2-core CPU.
BENCH_134M = ModelConfig(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048,
                         max_seq_len=4096)

PRESETS: dict[str, ModelConfig] = {
    "7b": LLAMA2_7B,
    "13b": LLAMA2_13B,
    "70b": LLAMA2_70B,
    "tiny": TINY,
    "tiny_gqa": TINY_GQA,
    "bench_134m": BENCH_134M,
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; valid: {sorted(PRESETS)}") from None
