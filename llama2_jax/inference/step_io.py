"""What the slots' jitted steps take and return: the per-slot state, a step's drawn tokens,
a prompt chunk's scores, and a cached prefix (llama2_jax.inference.slots)."""

from __future__ import annotations

from typing import NamedTuple

import jax

from llama2_jax.inference import penalties
from llama2_jax.inference.sampling import RowSampling


class SlotState(NamedTuple):
    """Per-slot decode state, replicated on every device."""

    tokens: jax.Array  # [S] int32, the token each slot feeds next
    positions: jax.Array  # [S] int32, where it goes; the cache length when the slot is idle
    sampling: RowSampling
    want_top: jax.Array  # [S] bool, the slot's request wants top log-probabilities
    penalties: penalties.RowPenalties  # [S] and [S, V]: what each row's penalties need


class StepOut(NamedTuple):
    """What one step drew for each of its rows (device arrays until read)."""

    tokens: jax.Array  # [R] int32
    logprob: jax.Array  # [R] float32, log-probability of the token under the model
    top_ids: jax.Array  # [R, TOP_LOGPROBS] int32 (zeros unless some row asked)
    top_logprobs: jax.Array  # [R, TOP_LOGPROBS] float32


class PromptScores(NamedTuple):
    """Log-probabilities of a prompt chunk's tokens under the model (device arrays until read):
    position i of the chunk scores the token after it (the chunk's next token, or the one
    after the chunk); the last position of a prompt's last chunk scores nothing (its token
    is the answer's first)."""

    logprob: jax.Array  # [T] float32 (the chunk's bucket; its first n are real)
    top_ids: jax.Array  # [T, TOP_LOGPROBS] int32
    top_logprobs: jax.Array  # [T, TOP_LOGPROBS] float32


class Prefix(NamedTuple):
    """Keys/values of a slot's first `length` positions, copied out of the cache: the whole
    position blocks that hold them, one row (nbytes is what they hold on the devices)."""

    kv: object  # like the staging cache, with only the first `blocks` position blocks
    length: int
    blocks: int
    nbytes: int
