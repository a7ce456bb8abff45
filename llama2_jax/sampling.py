"""Next-token samplers: small frozen dataclasses with one method `(logits, rng) -> tokens`."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Meta's chat defaults (llama/example_chat_completion.py).
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.9


@dataclasses.dataclass(frozen=True)
class Greedy:
    def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:  # [B, V] -> [B]
        del rng
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Sample:
    """Temperature sampling, optionally restricted to the top-k tokens and the top-p nucleus.

    Top-p follows Meta's `sample_top_p`: tokens sorted by probability are kept while the mass
    *before* them is at most p, so the token that crosses p is kept and at least one always is.
    """

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    top_k: int | None = None

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampling (use Greedy for 0), "
                             f"got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")

    def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:  # [B, V] -> [B]
        logits = logits.astype(jnp.float32) / self.temperature
        neg = jnp.finfo(jnp.float32).min
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = jax.lax.top_k(logits, self.top_k)[0][..., -1:]  # [B, 1]
            logits = jnp.where(logits < kth, neg, logits)
        if self.top_p < 1.0:
            order = jnp.argsort(-logits, axis=-1)
            sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
            probs = jax.nn.softmax(sorted_logits, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs
            sorted_logits = jnp.where(mass_before > self.top_p, neg, sorted_logits)
            choice = jax.random.categorical(rng, sorted_logits, axis=-1)  # [B]
            return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def make_sampler(temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
                 top_k: int | None = None):
    """Greedy for temperature 0, else Sample."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return Greedy()
    return Sample(temperature=float(temperature), top_p=float(top_p),
                  top_k=None if top_k in (None, 0) else int(top_k))


# -- per-row settings, for batches of requests that each sample their own way ------------------
TOP_LOGPROBS = 20  # the most alternatives a row may ask for (OpenAI's limit)


class RowSampling(NamedTuple):
    """Sampling settings of every row of a batch, as arrays, so one compiled step serves any mix.

    temperature [B] float32 (0 = greedy), top_p [B] float32 in (0, 1], top_k [B] int32 (0 = off),
    key [B, 2] uint32 (the row's own PRNG key), count [B] int32 (tokens the row has drawn: its
    n-th token uses fold_in(key, n), so a row's draws depend on its own key alone).
    """

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    key: jax.Array
    count: jax.Array


def row_settings(sampler) -> tuple[float, float, int]:
    """(temperature, top_p, top_k) of a Greedy or Sample, as RowSampling holds them."""
    if isinstance(sampler, Greedy):
        return 0.0, 1.0, 0
    return float(sampler.temperature), float(sampler.top_p), int(sampler.top_k or 0)


def sample_rows(logits: jax.Array, s: RowSampling) -> jax.Array:
    """One token per row of logits [B, V] with row b's own settings; [B] int32.

    Greedy rows take the argmax. Sampled rows follow `Sample`: temperature, then top-k (tokens
    at least as probable as the k-th), then Meta's top-p over what is left, drawn with
    fold_in(key, count). The sort that top-k/top-p need runs only when some row samples.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampling = s.temperature > 0

    def draw():
        neg = jnp.finfo(jnp.float32).min
        x = logits.astype(jnp.float32) / jnp.where(sampling, s.temperature, 1.0)[:, None]
        xs = -jnp.sort(-x, axis=-1)  # [B, V], most probable first
        k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, x.shape[-1]), x.shape[-1])
        kth = jnp.take_along_axis(xs, (k - 1)[:, None], axis=-1)  # [B, 1]
        xs = jnp.where(xs >= kth, xs, neg)
        probs = jax.nn.softmax(xs, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.sum(mass_before <= s.top_p[:, None], axis=-1)  # >= 1: the first always
        floor = jnp.take_along_axis(xs, (kept - 1)[:, None], axis=-1)  # [B, 1]
        # Masked and drawn in the vocabulary's own order, not the sorted one: logits that
        # differ in their last bits (another batch, another attention length) then change a
        # draw only at the nucleus' edge, instead of reordering near-ties.
        x = jnp.where(x >= jnp.maximum(floor, kth), x, neg)
        keys = jax.vmap(jax.random.fold_in)(s.key, s.count)
        drawn = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)  # [B]
        return jnp.where(sampling, drawn, greedy)

    return jax.lax.cond(jnp.any(sampling), draw, lambda: greedy)


def logprobs(logits: jax.Array, tokens: jax.Array, want_top: jax.Array):
    """Log-probabilities under the model's own distribution (float32 logits, before any
    temperature): of `tokens` [B], and the TOP_LOGPROBS most likely tokens of every row,
    computed only when some row wants them (`want_top` [B] bool; else zeros).

    Returns (chosen [B] float32, top_ids [B, TOP_LOGPROBS] int32, top [B, TOP_LOGPROBS]).
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - lse
    n = min(TOP_LOGPROBS, logits.shape[-1])

    def top():
        values, ids = jax.lax.top_k(logits, n)
        return ids.astype(jnp.int32), values - lse[:, None]

    def none():
        return (jnp.zeros((logits.shape[0], n), jnp.int32),
                jnp.zeros((logits.shape[0], n), jnp.float32))

    top_ids, top_lp = jax.lax.cond(jnp.any(want_top), top, none)
    return chosen, top_ids, top_lp
