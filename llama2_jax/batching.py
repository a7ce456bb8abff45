"""Continuous batching on the device: decode slots that requests join and leave at any step.

The shape of MaxText's MaxEngine and JetStream: a fixed number of slots, each one row of one
KV cache with its own position and sampling settings. `prefill` writes a prompt (or a chunk of
it) into a slot's row and draws the slot's first token; `insert` copies keys/values cached
earlier (a shared prefix) into a slot; one `decode` step advances every slot. The slot index,
positions and sampling settings are traced arrays and the cache and slot state are donated, so
requests come and go without recompiling; what is static is bucketed and counted:

  decode   one compile per attend length (the power-of-two bucket of the longest sequence in
           use): attention reads that prefix of the cache, not all of it;
  prefill  one per (chunk length bucket, attend length bucket);
  insert / extract   one per prefix length bucket.

An idle slot's position is the cache length, so its writes fall off the end (dropped) and a
prompt being prefilled in chunks between decode steps is never overwritten. This class owns
the device state and is driven by one thread (llama2_jax.scheduler); nothing here is
thread-safe.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llama2_jax import sharding
from llama2_jax.engine import Engine, _layers_for, bucket, cache_length
from llama2_jax.sampling import RowSampling, TOP_LOGPROBS, logprobs, sample_rows

f32, i32 = jnp.float32, jnp.int32


class SlotState(NamedTuple):
    """Per-slot decode state, replicated on every device."""

    tokens: jax.Array  # [S] int32, the token each slot feeds next
    positions: jax.Array  # [S] int32, where it goes; the cache length when the slot is idle
    sampling: RowSampling
    want_top: jax.Array  # [S] bool, the slot's request wants top log-probabilities


class StepOut(NamedTuple):
    """What one step drew for each of its rows (device arrays until read)."""

    tokens: jax.Array  # [R] int32
    logprob: jax.Array  # [R] float32, log-probability of the token under the model
    top_ids: jax.Array  # [R, TOP_LOGPROBS] int32 (zeros unless some row asked)
    top_logprobs: jax.Array  # [R, TOP_LOGPROBS] float32


@dataclasses.dataclass(frozen=True)
class Settings:
    """One request's sampling settings (temperature 0 = greedy; top_k 0 = off)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    top_logprobs: bool = False

    def key(self) -> np.ndarray:
        """The request's PRNG key (threefry's [hi, lo] words of the seed), made on the host."""
        seed = int(self.seed) & 0xFFFFFFFFFFFFFFFF
        return np.asarray([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


class Prefix(NamedTuple):
    """Keys/values of a slot's first `length` positions, copied out of the cache; the arrays
    are padded to a bucket of positions (nbytes is what they hold on the devices)."""

    kv: object  # like the cache, with one row and `bucket` positions
    length: int
    nbytes: int


class Slots:
    """`max_slots` decode slots of `length` positions each, over an Engine's model.

    Args:
      engine: the model's Engine (its weights, mesh, per-layer weight copies and caches).
      max_slots: rows of the decode batch.
      length: positions per slot: a request's prompt plus answer must fit.
      chunk: the longest prefill call; longer prompts are prefilled a chunk at a time.
      min_bucket: the smallest attend / prefill bucket.
    """

    def __init__(self, engine: Engine, max_slots: int, length: int, *, chunk: int = 256,
                 min_bucket: int = 16):
        cfg = engine.config
        if not 0 < length <= cfg.max_seq_len:
            raise ValueError(f"slot length {length} must be in 1..{cfg.max_seq_len}")
        if max_slots < 1 or chunk < 1:
            raise ValueError(f"max_slots ({max_slots}) and chunk ({chunk}) must be >= 1")
        self.engine, self.config = engine, cfg
        self.max_slots, self.length = max_slots, length
        self.chunk, self.min_bucket = min(chunk, length), min_bucket
        self.compile_count = 0  # traces of every step below
        self._replicated = NamedSharding(engine.mesh, PartitionSpec())
        self._decode = jax.jit(self._decode_fn, static_argnames=("attend",),
                               donate_argnames=("cache", "state"))
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("attend",),
                                donate_argnames=("cache", "state"))
        self._insert = jax.jit(self._insert_fn, donate_argnames=("cache", "state"))
        self._extract = jax.jit(self._extract_fn, static_argnames=("size",))
        # The weights as one flat tuple of arrays: jit flattens it in C++, an nnx.State costs
        # ~1.5 ms of Python per call (as much as a fifteenth of a 134M decode step on a CPU).
        leaves, self._weights_def = jax.tree.flatten((engine._state, engine._unstacked))
        self._weights = tuple(leaves)
        self.cache = engine.new_cache(max_slots, length)
        self.state = self._initial_state()
        self.positions = np.full(max_slots, length, np.int64)  # host mirror, for attend

    # -- buckets -----------------------------------------------------------------------------
    def bucket(self, n: int) -> int:
        """The static length a need of n positions compiles for (capped at the slot length)."""
        return min(bucket(max(n, self.min_bucket), self.length), self.length)

    def buckets(self, limit: int | None = None) -> list[int]:
        """Every bucket up to `limit` (default: the slot length)."""
        out, n = [], self.bucket(1)
        limit = self.length if limit is None else limit
        while True:
            out.append(n)
            if n >= limit:
                return out
            n = self.bucket(n + 1)

    # -- the jitted steps --------------------------------------------------------------------
    def _initial_state(self) -> SlotState:
        s = self.max_slots
        state = SlotState(
            tokens=np.zeros(s, np.int32), positions=np.full(s, self.length, np.int32),
            sampling=RowSampling(temperature=np.zeros(s, np.float32),
                                 top_p=np.ones(s, np.float32), top_k=np.zeros(s, np.int32),
                                 key=np.zeros((s, 2), np.uint32), count=np.zeros(s, np.int32)),
            want_top=np.zeros(s, bool))
        return jax.device_put(state, self._replicated)

    def _replicate(self, tree):
        return jax.tree.map(lambda x: sharding.constrain(x, (None,) * x.ndim), tree)

    def _out(self, logits, tokens, want_top) -> StepOut:
        return self._replicate(StepOut(tokens, *logprobs(logits, tokens, want_top)))

    def _model(self, weights):
        params, unstacked = jax.tree.unflatten(self._weights_def, weights)
        return nnx.merge(self.engine._graphdef, params), unstacked

    def _decode_fn(self, weights, cache, state: SlotState, attend: int):
        self.compile_count += 1
        engine = self.engine
        model, unstacked = self._model(weights)
        logits, cache = model(state.tokens[:, None], state.positions[:, None], cache,
                              attend=attend, unstacked=_layers_for(cache, unstacked))
        logits = logits[:, 0]  # [S, V]
        tokens = sample_rows(logits, state.sampling)
        s = state.sampling
        state = SlotState(tokens, jnp.minimum(state.positions + 1, self.length),
                          s._replace(count=s.count + 1), state.want_top)
        return (self._out(logits, tokens, state.want_top), self._replicate(state),
                engine._constrain_cache(cache))

    def _prefill_fn(self, weights, cache, state: SlotState, slot, tokens, start, n, final,
                    temperature, top_p, top_k, key, want_top, attend: int):
        """Feed tokens [1, T] (the first n real) at positions start.. of `slot`'s row."""
        self.compile_count += 1
        engine = self.engine
        model, unstacked = self._model(weights)
        at = (0, slot, 0, 0, 0)

        def row_of(c):  # [Lc, 1, K, attend, H]: the part of the row the chunk can see
            return jax.lax.dynamic_slice(c, at, (c.shape[0], 1, c.shape[2], attend, c.shape[4]))

        row = jax.tree.map(row_of, cache)
        positions = start + jnp.arange(tokens.shape[1], dtype=i32)[None]  # [1, T]
        logits, row = model(tokens, positions, row, logits_at=(n - 1)[None],
                            unstacked=_layers_for(cache, unstacked))  # [1, V]
        cache = jax.tree.map(lambda c, r: jax.lax.dynamic_update_slice(c, r, at), cache, row)
        sampling = RowSampling(temperature[None], top_p[None], top_k[None], key[None],
                               jnp.zeros(1, i32))
        first = sample_rows(logits, sampling)
        s = state.sampling

        def put(array, value):
            return array.at[slot].set(value)

        state = SlotState(
            tokens=put(state.tokens, first[0]),
            positions=put(state.positions, jnp.where(final, start + n, self.length)),
            sampling=RowSampling(put(s.temperature, temperature), put(s.top_p, top_p),
                                 put(s.top_k, top_k), put(s.key, key), put(s.count, 1)),
            want_top=put(state.want_top, want_top))
        return (self._out(logits, first, want_top[None]), self._replicate(state),
                engine._constrain_cache(cache))

    def _insert_fn(self, cache, state: SlotState, kv, slot):
        self.compile_count += 1
        cache = jax.tree.map(lambda c, p: jax.lax.dynamic_update_slice(c, p, (0, slot, 0, 0, 0)),
                             cache, kv)
        # The slot idles until its prefill: a step in between must not write into the prefix.
        state = state._replace(positions=state.positions.at[slot].set(self.length))
        return self.engine._constrain_cache(cache), self._replicate(state)

    def _extract_fn(self, cache, slot, size: int):
        self.compile_count += 1
        return jax.tree.map(
            lambda c: jax.lax.dynamic_slice(c, (0, slot, 0, 0, 0),
                                            (c.shape[0], 1, c.shape[2], size, c.shape[4])), cache)

    # -- what the scheduler calls ------------------------------------------------------------
    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} out of range 0..{self.max_slots - 1}")

    def prefill(self, slot: int, tokens: Sequence[int], start: int, final: bool,
                settings: Settings) -> StepOut:
        """Write `tokens` (at most `chunk`) at positions start.. of `slot`; with `final`, the
        slot starts decoding from the token drawn after them (returned, one row)."""
        self._check_slot(slot)
        n = len(tokens)
        if not 0 < n <= self.chunk:
            raise ValueError(f"a prefill call takes 1..{self.chunk} tokens, got {n}")
        if start + n > self.length - (1 if final else 0):
            raise ValueError(f"positions {start}..{start + n} do not fit a slot of "
                             f"{self.length} (with room for the next token)")
        t = self.bucket(n)
        attend = self.bucket(max(start + n, t))
        padded = np.zeros((1, t), np.int32)
        padded[0, :n] = tokens
        with jax.set_mesh(self.engine.mesh):
            out, self.state, self.cache = self._prefill(
                self._weights, self.cache, self.state,
                np.int32(slot), padded, np.int32(start), np.int32(n), np.bool_(final),
                np.float32(settings.temperature), np.float32(settings.top_p),
                np.int32(settings.top_k), settings.key(), np.bool_(settings.top_logprobs),
                attend=attend)
        self.positions[slot] = start + n if final else self.length
        return out

    def release(self, slot: int) -> None:
        """Forget `slot` on the host; its row idles on the device until the next prefill
        (its writes land past its request's tokens, which no one reads)."""
        self._check_slot(slot)
        self.positions[slot] = self.length

    def decode(self) -> StepOut:
        """One step of every slot; attention reads the bucket of the longest active one."""
        active = self.positions[self.positions < self.length]
        attend = self.bucket(int(active.max()) + 1 if active.size else 1)
        with jax.set_mesh(self.engine.mesh):
            out, self.state, self.cache = self._decode(self._weights, self.cache, self.state,
                                                       attend=attend)
        live = self.positions < self.length
        self.positions[live] += 1
        return out

    def extract(self, slot: int, length: int) -> Prefix:
        """A copy of the keys/values at positions 0..length-1 of `slot` (a prefix to reuse)."""
        self._check_slot(slot)
        if not 0 < length <= self.length:
            raise ValueError(f"prefix length {length} must be in 1..{self.length}")
        with jax.set_mesh(self.engine.mesh):
            kv = self._extract(self.cache, np.int32(slot), size=self.bucket(length))
        return Prefix(kv, length, sum(x.nbytes for x in jax.tree.leaves(kv)))

    def insert(self, slot: int, prefix: Prefix) -> None:
        """Copy a Prefix into `slot` (its first prefix.length positions become valid)."""
        self._check_slot(slot)
        with jax.set_mesh(self.engine.mesh):
            self.cache, self.state = self._insert(self.cache, self.state, prefix.kv,
                                                  np.int32(slot))
        self.positions[slot] = self.length

    def prefix_bytes(self, length: int) -> int:
        """Device bytes of a Prefix of `length` positions (padded to its bucket)."""
        per_position = sum(x.nbytes for x in jax.tree.leaves(self.cache)) // (
            self.max_slots * self.length)
        return per_position * self.bucket(length)

    def warm_up(self) -> int:
        """Compile every step this server can need; returns how many were compiled."""
        before = self.compile_count
        settings = Settings()
        for t in self.buckets(self.chunk):
            for attend in self.buckets():
                if attend < t:
                    continue
                # a chunk of t tokens ending at `attend` positions: the shapes prefill compiles
                start = max(0, min(attend, self.length - 1) - t)
                if self.bucket(max(start + t, t)) == attend and start + t <= self.length - 1:
                    self.prefill(0, [0] * t, start, True, settings)
        for size in self.buckets():
            self.insert(0, self.extract(0, size))
        self.release(0)
        for attend in self.buckets():
            self.positions[0] = attend - 1
            self.decode()
        self.release(0)
        jax.block_until_ready(self.cache)
        return self.compile_count - before
