"""Continuous batching on the device: decode slots that requests join and leave at any step.

The shape of MaxText's MaxEngine and JetStream: a fixed number of slots, each one row of one
KV cache with its own position and sampling settings. `prefill` runs a prompt (or a chunk of
it) through the model in a one-row staging cache, copies its keys/values into the slot's row
and draws the slot's first token; `insert` puts keys/values cached earlier (a shared prefix)
into the staging row first; one `decode` step advances the slots in use. The slot index,
positions and sampling settings are traced arrays and the caches and slot state are donated,
so requests come and go without recompiling; what is static is bucketed and counted:

  decode   one compile per (row count, attend length): the rows are the bucket (1, 4, 16,
           ... with row_growth 4) of the highest slot in use (the scheduler fills the lowest
           free slots first), the attend length that of the longest sequence in use. A step
           computes those rows only, and attention reads only that prefix of their cache:
           one request in a server of 64 slots x 4096 positions pays for one row of a few
           positions;
  prefill  one per (chunk length bucket, attend length bucket), over the staging row;
  commit / insert / extract   one per number of position blocks.

The cache is laid out in row groups x position blocks (llama2_jax.kv_cache.Blocks) whose
boundaries are the buckets, so no step reads a slice of an array (XLA:CPU would copy it).
Attend lengths are power-of-two multiples of the block (`kv_block`). An idle slot's position
is the cache length, so its writes fall off the end (dropped). One request is prefilled at a
time (the scheduler finishes the oldest first): its chunks attend over the staging row, and
the last one commits the row's blocks into the slot's row. This class owns the device state
and is driven by one thread (llama2_jax.scheduler); nothing here is thread-safe.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llama2_jax import kv_cache, sharding
from llama2_jax.engine import Engine, _layers_for, bucket
from llama2_jax.kv_cache import Blocks, KVCache
from llama2_jax.sampling import RowSampling, logprobs, sample_rows

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
    """Keys/values of a slot's first `length` positions, copied out of the cache: the whole
    position blocks that hold them, one row (nbytes is what they hold on the devices)."""

    kv: object  # like the staging cache, with only the first `blocks` position blocks
    length: int
    blocks: int
    nbytes: int


def _map_layers(fn, *caches):
    """fn over each layer's Blocks (a per-layer tuple) or over the stacked Blocks."""
    if isinstance(caches[0], Blocks):
        return fn(*caches)
    return tuple(fn(*layer) for layer in zip(*caches))


def default_kv_block(length: int) -> int:
    """Positions per block of a KV cache of `length`: from 128 on CPU (512 on accelerators,
    where each block costs kernel launches: not measured there yet), doubled until at most
    four blocks cover the cache. Every (row group, block) pair is a few kernels per layer in
    each compiled step, and XLA:CPU maps memory for each kernel: with 64 slots in 7 groups x
    5 blocks, the server's steps for BENCH_134M exceeded Linux's default 65530 memory maps."""
    block = 128 if jax.default_backend() == "cpu" else 512
    while length > 4 * block:
        block *= 2
    return block


class Slots:
    """`max_slots` decode slots of `length` positions each, over an Engine's model.

    Args:
      engine: the model's Engine (its weights, mesh and per-layer weight copies).
      max_slots: rows of the decode batch.
      length: positions per slot: a request's prompt plus answer must fit.
      chunk: the longest prefill call; longer prompts are prefilled a chunk at a time.
      min_bucket: the smallest prefill bucket.
      kv_block: positions per block of the KV cache, a power of two (None: default_kv_block);
        the smallest attend length.
      row_growth: decode steps compute 1, row_growth, row_growth^2, ... rows (the row groups
        of the cache): smaller wastes fewer rows, larger compiles fewer and smaller steps.
    """

    def __init__(self, engine: Engine, max_slots: int, length: int, *, chunk: int = 256,
                 min_bucket: int = 16, kv_block: int | None = None, row_growth: int = 4):
        cfg = engine.config
        if not 0 < length <= cfg.max_seq_len:
            raise ValueError(f"slot length {length} must be in 1..{cfg.max_seq_len}")
        if max_slots < 1 or chunk < 1:
            raise ValueError(f"max_slots ({max_slots}) and chunk ({chunk}) must be >= 1")
        kv_block = default_kv_block(length) if kv_block is None else kv_block
        if kv_block < 1 or kv_block & (kv_block - 1):
            raise ValueError(f"kv_block={kv_block} must be a power of two")
        self.engine, self.config = engine, cfg
        self.max_slots, self.length = max_slots, length
        self.chunk, self.min_bucket = min(chunk, length), min_bucket
        self.kv_block = min(kv_block, length)
        if row_growth < 2:
            raise ValueError(f"row_growth={row_growth} must be >= 2")
        self.groups = kv_cache.group_sizes(max_slots, row_growth)
        self.blocks = kv_cache.block_sizes(length, self.kv_block)
        self._per_layer = engine._unstacked is not None
        self.compile_count = 0  # traces of every step below
        self._replicated = NamedSharding(engine.mesh, PartitionSpec())
        self._decode = jax.jit(self._decode_fn, static_argnames=("rows", "attend"),
                               donate_argnames=("cache", "state"))
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("attend",),
                                donate_argnames=("stage", "state"))
        self._commit = jax.jit(self._commit_fn, static_argnames=("blocks",),
                               donate_argnames=("cache",))
        self._insert = jax.jit(self._insert_fn, donate_argnames=("stage", "state"))
        self._extract = jax.jit(self._extract_fn, static_argnames=("n",))
        # The weights as one flat tuple of arrays: jit flattens it in C++, an nnx.State costs
        # ~1.5 ms of Python per call (as much as a fifteenth of a 134M decode step on a CPU).
        leaves, self._weights_def = jax.tree.flatten((engine._state, engine._unstacked))
        self._weights = tuple(leaves)
        self.cache = self._new_cache(self.groups)
        self.stage = self._new_cache((1,))
        self.state = self._initial_state()
        self.positions = np.full(max_slots, length, np.int64)  # host mirror, for buckets
        self._staged = (-1, 0)  # (slot, positions) the staging row holds for that slot

    # -- buckets -----------------------------------------------------------------------------
    def bucket(self, n: int) -> int:
        """The static length a prefill of n tokens compiles for: a power of two up to
        4 x min_bucket, then a multiple of that (less padding than powers of two: a prompt's
        last chunk is any length), capped at the chunk."""
        step = 4 * self.min_bucket
        if n > step:
            return min(-(-n // step) * step, self.chunk)
        return min(bucket(max(n, self.min_bucket), self.length), self.chunk)

    def attend_bucket(self, n: int) -> int:
        """Positions a step that needs n of them reads: kv_block x a power of two, or all."""
        size = self.kv_block
        while size < n:
            size *= 2
        return min(size, self.length)

    def buckets(self) -> list[int]:
        """Every attend length."""
        out = [self.attend_bucket(1)]
        while out[-1] < self.length:
            out.append(self.attend_bucket(out[-1] + 1))
        return out

    def chunk_buckets(self) -> list[int]:
        out = [self.bucket(1)]
        while out[-1] < self.chunk:
            out.append(self.bucket(out[-1] + 1))
        return out

    def row_buckets(self) -> list[int]:
        """Rows a decode step may compute: the leading row groups, 1, 2, 4, ..., max_slots."""
        return list(itertools.accumulate(self.groups))

    def row_bucket(self, n: int) -> int:
        return next(r for r in self.row_buckets() if r >= n)

    def _blocks_for(self, n: int) -> int:
        """Position blocks that hold positions 0..n-1."""
        return next(j + 1 for j, end in enumerate(itertools.accumulate(self.blocks)) if end >= n)

    # -- device state ------------------------------------------------------------------------
    def _new_cache(self, groups):
        cfg = self.config
        layers = None if self._per_layer else cfg.n_layers

        def make():
            def one():
                return kv_cache.init_blocks(layers, groups, self.blocks, cfg.n_kv_heads,
                                            cfg.head_dim, cfg.compute_dtype)
            return tuple(one() for _ in range(cfg.n_layers)) if self._per_layer else one()

        shardings = jax.tree.map(
            lambda x: sharding.named_sharding(self.engine.mesh, KVCache.axes(x.ndim), x.shape),
            jax.eval_shape(make))
        return jax.jit(make, out_shardings=shardings)()

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

    # -- the jitted steps --------------------------------------------------------------------
    def _decode_fn(self, weights, cache, state: SlotState, rows: int, attend: int):
        self.compile_count += 1
        engine = self.engine
        model, unstacked = self._model(weights)
        live = jax.tree.map(lambda x: x[:rows], state)  # slots 0..rows-1; the rest keep theirs
        logits, cache = model(live.tokens[:, None], live.positions[:, None], cache,
                              attend=attend, unstacked=_layers_for(cache, unstacked))
        logits = logits[:, 0]  # [rows, V]
        tokens = sample_rows(logits, live.sampling)
        s = live.sampling
        live = SlotState(tokens, jnp.minimum(live.positions + 1, self.length),
                         s._replace(count=s.count + 1), live.want_top)
        state = jax.tree.map(
            lambda full, part: jax.lax.dynamic_update_slice(full, part, (0,) * full.ndim),
            state, live)
        return (self._out(logits, tokens, live.want_top), self._replicate(state),
                engine._constrain_cache(cache))

    def _prefill_fn(self, weights, stage, state: SlotState, slot, tokens, start, n, final,
                    temperature, top_p, top_k, key, want_top, attend: int):
        """Feed tokens [1, T] (the first n real) at positions start.. of the staging row."""
        self.compile_count += 1
        engine = self.engine
        model, unstacked = self._model(weights)
        positions = start + jnp.arange(tokens.shape[1], dtype=i32)[None]  # [1, T]
        logits, stage = model(tokens, positions, stage, logits_at=(n - 1)[None], attend=attend,
                              unstacked=_layers_for(stage, unstacked))  # [1, V]
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
                engine._constrain_cache(stage))

    def _commit_fn(self, cache, stage, slot, blocks: int):
        """The cache with the staging row's first `blocks` position blocks in row `slot`."""
        self.compile_count += 1
        return self.engine._constrain_cache(
            _map_layers(lambda c, s: self._copy_row(c, s, slot, blocks), cache, stage))

    def _copy_row(self, cache: Blocks, stage: Blocks, slot, blocks: int) -> Blocks:
        """`cache` with the first `blocks` position blocks of the staging row in row `slot`
        (written into each row group, dropped where the slot is not)."""
        groups, start = [], 0
        for group in cache.groups:
            size = group[0].rows
            inside = (slot >= start) & (slot < start + size)
            row = jnp.where(inside, slot - start, size)

            def put(c, src):  # src: the staging row, [L, 1, K, S, H] or [K, S, H]
                if c.ndim == 5:
                    return c.at[:, row].set(src[:, 0], mode="drop")
                if c.ndim == 4:
                    return c.at[row].set(src, mode="drop")
                return jnp.where(inside, src, c)  # a one-row group

            groups.append(tuple(
                KVCache(put(blk.k, src.k), put(blk.v, src.v)) if j < blocks else blk
                for j, (blk, src) in enumerate(zip(group, stage.groups[0]))))
            start += size
        return Blocks(tuple(groups))

    def _insert_fn(self, stage, state: SlotState, kv, slot):
        """The staging row with a prefix's blocks (copies) in front; `slot` idles until its
        prefill (so a step in between cannot write into the row it is about to get)."""
        self.compile_count += 1

        def put(st: Blocks, prefix: Blocks) -> Blocks:
            blocks = list(st.groups[0])
            for j, blk in enumerate(prefix.groups[0]):
                blocks[j] = KVCache(jnp.copy(blk.k), jnp.copy(blk.v))
            return Blocks((tuple(blocks),))

        stage = _map_layers(put, stage, kv)
        state = state._replace(positions=state.positions.at[slot].set(self.length))
        return self.engine._constrain_cache(stage), self._replicate(state)

    def _extract_fn(self, cache, slot, n: int):
        """The first n position blocks of row `slot`, one row (a branch per row group)."""
        self.compile_count += 1
        starts = [0, *itertools.accumulate(self.groups)][:-1]
        group = sum((slot >= s).astype(i32) for s in starts[1:])

        def branch(g):
            def take(c: Blocks) -> Blocks:
                row = slot - starts[g]

                def one(a):  # the row, in the staging row's shape
                    if a.ndim == 5:
                        return jax.lax.dynamic_slice_in_dim(a, row, 1, axis=1)
                    if a.ndim == 4:
                        return jax.lax.dynamic_index_in_dim(a, row, 0, keepdims=False)
                    return jnp.copy(a)
                return Blocks((tuple(KVCache(one(blk.k), one(blk.v))
                                     for blk in c.groups[g][:n]),))
            return lambda c: _map_layers(take, c)

        return jax.lax.switch(group, [branch(g) for g in range(len(self.groups))], cache)

    # -- what the scheduler calls ------------------------------------------------------------
    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} out of range 0..{self.max_slots - 1}")

    def prefill(self, slot: int, tokens: Sequence[int], start: int, final: bool,
                settings: Settings) -> StepOut:
        """Write `tokens` (at most `chunk`) at positions start.. of `slot`; with `final`, the
        slot starts decoding from the token drawn after them (returned, one row). A prompt's
        chunks come in order from start 0 (or from up to a Prefix's length after `insert`),
        and one slot's prompt is prefilled at a time."""
        self._check_slot(slot)
        n = len(tokens)
        if not 0 < n <= self.chunk:
            raise ValueError(f"a prefill call takes 1..{self.chunk} tokens, got {n}")
        if start + n > self.length - (1 if final else 0):
            raise ValueError(f"positions {start}..{start + n} do not fit a slot of "
                             f"{self.length} (with room for the next token)")
        if start and not (self._staged[0] == slot and start <= self._staged[1]):
            raise ValueError(f"slot {slot} has no prompt prefilled up to position {start} "
                             f"(the staging row holds slot, positions = {self._staged}): "
                             "prefill a prompt's chunks in order, one prompt at a time")
        t = self.bucket(n)
        attend = self.attend_bucket(start + n)
        padded = np.zeros((1, t), np.int32)
        padded[0, :n] = tokens
        with jax.set_mesh(self.engine.mesh):
            out, self.state, self.stage = self._prefill(
                self._weights, self.stage, self.state,
                np.int32(slot), padded, np.int32(start), np.int32(n), np.bool_(final),
                np.float32(settings.temperature), np.float32(settings.top_p),
                np.int32(settings.top_k), settings.key(), np.bool_(settings.top_logprobs),
                attend=attend)
            if final:  # the prompt's keys/values into the slot's row, where decode reads
                self.cache = self._commit(self.cache, self.stage, np.int32(slot),
                                          blocks=self._blocks_for(start + n))
        self._staged = (slot, start + n)
        self.positions[slot] = start + n if final else self.length
        return out

    def release(self, slot: int) -> None:
        """Forget `slot` on the host; its row idles on the device until the next prefill
        (its writes land past its request's tokens, which no one reads)."""
        self._check_slot(slot)
        self.positions[slot] = self.length

    def decode(self) -> StepOut:
        """One step of the slots up to the highest active one (its row bucket), attending over
        the bucket of the longest; the output has a row per computed slot."""
        live = np.flatnonzero(self.positions < self.length)
        rows = self.row_bucket(int(live[-1]) + 1 if live.size else 1)
        attend = self.attend_bucket(int(self.positions[live].max()) + 1 if live.size else 1)
        with jax.set_mesh(self.engine.mesh):
            out, self.state, self.cache = self._decode(self._weights, self.cache, self.state,
                                                       rows=rows, attend=attend)
        live = self.positions < self.length
        self.positions[live] += 1
        return out

    def extract(self, slot: int, length: int) -> Prefix:
        """A copy of the keys/values at positions 0..length-1 of `slot` (a prefix to reuse)."""
        self._check_slot(slot)
        if not 0 < length <= self.length:
            raise ValueError(f"prefix length {length} must be in 1..{self.length}")
        n = self._blocks_for(length)
        with jax.set_mesh(self.engine.mesh):
            kv = self._extract(self.cache, np.int32(slot), n=n)
        return Prefix(kv, length, n, sum(x.nbytes for x in jax.tree.leaves(kv)))

    def insert(self, slot: int, prefix: Prefix) -> None:
        """Start `slot`'s prompt from a Prefix: its first prefix.length positions are valid
        and the prompt's next chunk is prefilled at prefix.length."""
        self._check_slot(slot)
        with jax.set_mesh(self.engine.mesh):
            self.stage, self.state = self._insert(self.stage, self.state, prefix.kv,
                                                  np.int32(slot))
        self._staged = (slot, prefix.length)
        self.positions[slot] = self.length

    def prefix_bytes(self, length: int) -> int:
        """Device bytes of a Prefix of `length` positions (whole blocks)."""
        row = sum(x.nbytes for x in jax.tree.leaves(self.stage)) // self.length
        return row * sum(self.blocks[:self._blocks_for(length)])

    def warm_up(self) -> int:
        """Compile every step this server can need; returns how many were compiled."""
        before = self.compile_count
        settings = Settings()
        for t in self.chunk_buckets():
            for attend in self.buckets():
                # a chunk whose bucket is t ending inside `attend`: the shapes prefill compiles
                n = min(t, attend, self.length - 1)
                start = max(0, min(attend, self.length - 1) - n)
                if self.bucket(n) == t and self.attend_bucket(start + n) == attend:
                    self._staged = (0, start)
                    self.prefill(0, [0] * n, start, True, settings)
        for n in range(1, len(self.blocks) + 1):
            with jax.set_mesh(self.engine.mesh):
                self.cache = self._commit(self.cache, self.stage, np.int32(0), blocks=n)
            self.insert(0, self.extract(0, sum(self.blocks[:n])))
        self._staged = (-1, 0)
        self.release(0)
        for rows in self.row_buckets():
            for attend in self.buckets():
                self.positions[rows - 1] = attend - 1  # the highest slot sets the rows
                self.decode()
                self.positions[rows - 1] = self.length
        jax.block_until_ready((self.cache, self.stage))
        return self.compile_count - before
