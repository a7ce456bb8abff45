"""What the slots' jitted steps take and return: the per-slot state, a step's drawn tokens,
a prompt chunk's scores, and a cached prefix (llama2_jax.inference.slots)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from llama2_jax.inference import penalties
from llama2_jax.inference.requests import mask_words
from llama2_jax.inference.sampling import RowSampling
from llama2_jax.model import kv_cache, sharding


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


def new_cache(weights, shapes, groups, abstract: bool = False, quantization: str = "none"):
    """A zero KV cache of row `groups` x the position blocks of `shapes` (a Shapes) for the
    Weights: one per layer when they run per layer, in the compute dtype or 8-bit
    (`quantization`, kv_cache.KV_METHODS). `abstract`: ShapeDtypeStructs."""
    cfg, per_layer = weights.config, weights.per_layer

    def make():
        def one():
            return kv_cache.init_blocks(None if per_layer else cfg.n_layers, groups,
                                        shapes.blocks, cfg.n_kv_heads, cfg.head_dim,
                                        cfg.compute_dtype, quantization)
        return tuple(one() for _ in range(cfg.n_layers)) if per_layer else one()

    found = jax.eval_shape(make)
    shardings = kv_cache.map_arrays(
        lambda x, axes: sharding.named_sharding(weights.mesh, axes, x.shape), found)
    if abstract:
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            found, shardings)
    return jax.jit(make, out_shardings=shardings)()


def initial_state(slots: int, length: int, vocab_size: int, replicated,
                  abstract: bool = False) -> SlotState:
    """Every slot idle (at position `length`), greedy, unpenalized; on `replicated`."""
    s = slots
    state = SlotState(
        tokens=np.zeros(s, np.int32), positions=np.full(s, length, np.int32),
        sampling=RowSampling(temperature=np.zeros(s, np.float32),
                             top_p=np.ones(s, np.float32), top_k=np.zeros(s, np.int32),
                             key=np.zeros((s, 2), np.uint32), count=np.zeros(s, np.int32),
                             min_p=np.zeros(s, np.float32)),
        want_top=np.zeros(s, bool),
        penalties=penalties.empty(s, vocab_size))
    if abstract:
        return jax.tree.map(lambda x: abstract_like(x, replicated), state)
    return jax.device_put(state, replicated)


def abstract_like(x, replicated) -> jax.ShapeDtypeStruct:
    """A ShapeDtypeStruct like `x` (an array, or a numpy dtype for a scalar) on `replicated`."""
    if isinstance(x, (np.dtype, type)):
        return jax.ShapeDtypeStruct((), x, sharding=replicated)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=replicated)


def bitmasks(allowed, rows: tuple[int, ...], vocab_size: int) -> np.ndarray:
    """Allowed-token bitmask(s) as an int32 array [*rows, W] (all zeros, no constraint, for
    None); ValueError for another shape."""
    shape = (*rows, mask_words(vocab_size))
    if allowed is None:
        return np.zeros(shape, np.int32)
    allowed = np.asarray(allowed, np.int32)
    if allowed.shape != shape:
        raise ValueError(f"allowed-token bitmask of shape {allowed.shape}, expected {shape}")
    return allowed
