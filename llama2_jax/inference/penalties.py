"""Penalties and biases as per-row arrays over the vocabulary, kept on the device per slot, so
one compiled step serves rows with and without them (SamplingParams says what each means).

Each slot's row holds its request's logit bias, the tokens min_tokens holds back, the tokens
the repetition penalty hits (the prompt's and the answer's) and the answer's token counts
(frequency and presence): [slots, vocab] arrays, written when a prompt is prefilled and
updated by a scatter per step. The logits are only touched when some row of a step asked.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llama2_jax.inference.params import SamplingParams

f32, i32 = jnp.float32, jnp.int32


class RowPenalties(NamedTuple):
    """Per-row settings ([B]) and vocabulary rows ([B, V]) of the penalties."""

    on: jax.Array  # [B] bool: the row has some penalty or bias
    presence: jax.Array  # [B] float32
    frequency: jax.Array  # [B] float32
    repetition: jax.Array  # [B] float32 (1 = off)
    min_tokens: jax.Array  # [B] int32
    bias: jax.Array  # [B, V] float32, added to the logits
    banned: jax.Array  # [B, V] bool, held back while fewer than min_tokens were drawn
    seen: jax.Array  # [B, V] bool, prompt and answer tokens (repetition penalty)
    counts: jax.Array  # [B, V] int32, answer tokens (frequency and presence)


def empty(rows: int, vocab: int) -> RowPenalties:
    """Host arrays of `rows` rows without penalties."""
    return RowPenalties(
        on=np.zeros(rows, bool), presence=np.zeros(rows, np.float32),
        frequency=np.zeros(rows, np.float32), repetition=np.ones(rows, np.float32),
        min_tokens=np.zeros(rows, np.int32), bias=np.zeros((rows, vocab), np.float32),
        banned=np.zeros((rows, vocab), bool), seen=np.zeros((rows, vocab), bool),
        counts=np.zeros((rows, vocab), np.int32))


def of(params: SamplingParams, vocab: int) -> RowPenalties:
    """One row (host arrays, [1] and [1, V]) of a request's settings, before its answer.
    Token ids outside the vocabulary raise ValueError."""
    p = empty(1, vocab)
    for name, ids in (("logit_bias", [t for t, _ in params.logit_bias]),
                      ("banned", params.banned), ("prompt_tokens", params.prompt_tokens)):
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{name}: token id {bad[0]} is outside the vocabulary "
                             f"0..{vocab - 1}")
    if not params.penalized:
        return p
    for t, b in params.logit_bias:
        p.bias[0, t] = b
    p.banned[0, list(params.banned)] = True
    if params.repetition_penalty != 1:
        p.seen[0, list(params.prompt_tokens)] = True
    return p._replace(
        on=np.ones(1, bool), presence=np.float32([params.presence_penalty]),
        frequency=np.float32([params.frequency_penalty]),
        repetition=np.float32([params.repetition_penalty]),
        min_tokens=np.int32([params.min_tokens]))


def apply(logits: jax.Array, p: RowPenalties, on: jax.Array, drawn: jax.Array) -> jax.Array:
    """logits [R, V] of the first R rows of `p` with their penalties, where `on` [R] (the
    rows in use that asked); `drawn` [R]: tokens each row has drawn so far."""
    R = logits.shape[0]

    def penalized():
        x = logits.astype(f32)
        ban = p.banned[:R] & (drawn < p.min_tokens[:R])[:, None]
        x = jnp.where(ban, -jnp.inf, x + p.bias[:R])
        r = p.repetition[:R, None]
        x = jnp.where(p.seen[:R], jnp.where(x > 0, x / r, x * r), x)
        c = p.counts[:R]
        x = x - p.frequency[:R, None] * c.astype(f32) - p.presence[:R, None] * (c > 0)
        return jnp.where(on[:, None], x, logits.astype(f32))

    return jax.lax.cond(jnp.any(on), penalized, lambda: logits.astype(f32))


def record(p: RowPenalties, tokens: jax.Array, on: jax.Array) -> RowPenalties:
    """`p` with tokens [R] counted in rows 0..R-1 where `on` [R]."""
    rows = jnp.arange(tokens.shape[0])
    return p._replace(counts=p.counts.at[rows, tokens].add(on.astype(i32)),
                      seen=p.seen.at[rows, tokens].max(on))


def put(p: RowPenalties, slot, row: RowPenalties) -> RowPenalties:
    """`p` with row `slot` set to the one row `row`."""
    return jax.tree.map(lambda full, one: full.at[slot].set(one[0]), p, row)
