"""llama2_jax: Meta's Llama 2 in JAX/Flax, sharded over whatever devices are present.

The public API (`load`, `generate`, `forward`, `stream_text`, `Engine`, `Session`, ...) is
imported on first use, so parts that need no JAX (the tokenizer, the request settings, the
HTTP layer) import without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# name -> module that defines it
_EXPORTS = {
    "CheckpointError": "llama2_jax.model.checkpoint",
    "load": "llama2_jax.model.checkpoint",
    "save": "llama2_jax.model.checkpoint",
    "ConfigError": "llama2_jax.model.config",
    "ModelConfig": "llama2_jax.model.config",
    "from_hf_config": "llama2_jax.model.config",
    "from_meta_params": "llama2_jax.model.config",
    "preset": "llama2_jax.model.config",
    "Transformer": "llama2_jax.model.transformer",
    "QArray": "llama2_jax.model.quant",
    "quantize_model": "llama2_jax.model.quant",
    "make_mesh": "llama2_jax.model.sharding",
    "ContextError": "llama2_jax.inference.generate",
    "Engine": "llama2_jax.inference.generate",
    "Session": "llama2_jax.inference.generate",
    "engine_for": "llama2_jax.inference.api",
    "forward": "llama2_jax.inference.api",
    "generate": "llama2_jax.inference.api",
    "stream_text": "llama2_jax.inference.api",
    "GREEDY": "llama2_jax.inference.params",
    "SamplingParams": "llama2_jax.inference.params",
    "DialogError": "llama2_jax.tokenizer",
    "StreamDecoder": "llama2_jax.tokenizer",
    "Tokenizer": "llama2_jax.tokenizer",
    "encode_dialog": "llama2_jax.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llama2_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from llama2_jax.inference.api import engine_for, forward, generate, stream_text  # noqa: F401
    from llama2_jax.inference.generate import ContextError, Engine, Session  # noqa: F401
    from llama2_jax.inference.params import GREEDY, SamplingParams  # noqa: F401
    from llama2_jax.model.checkpoint import CheckpointError, load, save  # noqa: F401
    from llama2_jax.model.config import (ConfigError, ModelConfig, from_hf_config,  # noqa: F401
                                         from_meta_params, preset)
    from llama2_jax.model.quant import QArray, quantize_model  # noqa: F401
    from llama2_jax.model.sharding import make_mesh  # noqa: F401
    from llama2_jax.model.transformer import Transformer  # noqa: F401
    from llama2_jax.tokenizer import DialogError, StreamDecoder, Tokenizer, encode_dialog  # noqa: F401
