"""The one sampler: every row of a batch draws with its own settings (per-row arrays), so one
compiled step serves any mix of greedy and sampled rows; and log-probabilities."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llama2_jax.inference.params import TOP_LOGPROBS

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


def sample_rows(logits: jax.Array, s: RowSampling) -> jax.Array:
    """One token per row of logits [B, V] with row b's own settings; [B] int32.

    Greedy rows take the argmax. Sampled rows (llama2_jax.inference.params.SamplingParams): temperature, then top-k (tokens
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
