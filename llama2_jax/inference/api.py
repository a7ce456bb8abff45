"""The library's functions over a model: `generate`, `forward`, `stream_text` (re-exported by
the package), each through the model's one Engine (llama2_jax.inference.generate)."""

from __future__ import annotations

import weakref
from typing import Iterator, Sequence

import numpy as np

from llama2_jax.inference.generate import Engine
from llama2_jax.inference.params import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, sampling_params
from llama2_jax.model.transformer import Transformer
from llama2_jax.tokenizer import StreamDecoder, Tokenizer

_ENGINES: "weakref.WeakKeyDictionary[Transformer, Engine]" = weakref.WeakKeyDictionary()


def engine_for(model: Transformer) -> Engine:
    """The model's Engine, created once so repeated calls reuse its compiled steps."""
    engine = _ENGINES.get(model)
    if engine is None:
        engine = _ENGINES[model] = Engine(model)
    return engine


def generate(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
             top_k: int | None = None, seed: int = 0,
             stop_ids: Sequence[int] | None = None) -> list[list[int]]:
    """New token ids of each prompt (a list of token-id lists), stop token excluded.

    Stops a row at EOS (`stop_ids`, default Llama 2's EOS id 2), after `max_new_tokens`, or
    at the context limit. temperature=0 is greedy; row b draws with seed + b.
    """
    return engine_for(model).generate(
        prompts, max_new_tokens=max_new_tokens,
        params=sampling_params(temperature, top_p, top_k, seed),
        stop_ids=(2,) if stop_ids is None else stop_ids)


def forward(model: Transformer, token_ids: Sequence[int]) -> np.ndarray:
    """Float32 logits [T, vocab] of one token sequence."""
    return engine_for(model).forward(token_ids)


def stream_text(model: Transformer, tokenizer: Tokenizer, prompt: Sequence[int], *,
                max_new_tokens: int, temperature: float = DEFAULT_TEMPERATURE,
                top_p: float = DEFAULT_TOP_P, top_k: int | None = None,
                seed: int = 0) -> Iterator[str]:
    """Text of the answer to one token-id prompt, piece by piece as it is decoded.

    Pieces never split a multi-byte character; generation stops at the tokenizer's EOS.
    """
    decoder = StreamDecoder(tokenizer)
    steps = engine_for(model).stream(
        [prompt], max_new_tokens=max_new_tokens, stop_ids=(tokenizer.eos_id,),
        params=sampling_params(temperature, top_p, top_k, seed))
    for step in steps:
        if step.tokens[0] is not None:
            piece = decoder.push(step.tokens[:1])
            if piece:
                yield piece
    tail = decoder.flush()
    if tail:
        yield tail
