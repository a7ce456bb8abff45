"""Next-token samplers: small frozen dataclasses with one method `(logits, rng) -> tokens`."""

from __future__ import annotations

import dataclasses

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
