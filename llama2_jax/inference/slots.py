"""The device stepper: decode slots that rows join and leave at any step. Every door drives it
(`generate`, `stream_text`, `Engine.stream`, a chat `Session`, the server's scheduler). The
shape of MaxText's MaxEngine and JetStream: a fixed number of slots, each one row of one
KV cache (in the compute dtype or 8-bit) with its own position and sampling settings.
`prefill` runs a prompt (or a chunk of it) through the model in a one-row staging cache,
copies its keys/values into the slot's row and draws the slot's first token; `insert` puts
keys/values cached earlier (a shared prefix) into the staging row first; one `decode` step
advances the slots in use. The slot index, positions and sampling settings are traced arrays
and the caches and slot state are donated, so rows come and go without recompiling; what is
static is bucketed (llama2_jax.inference.buckets) and counted.

The cache is laid out in row groups x position blocks (llama2_jax.model.kv_cache.Blocks) whose
boundaries are the buckets, so no step reads a slice of an array (XLA:CPU would copy it). An
idle slot's position is the cache length, so its writes fall off the end (dropped): the host
passes which slots are in use to every decode step, so a released slot computes as greedy and
writes nothing, whatever its last request was. One row is prefilled at a time: its chunks
attend over the staging row, and the last one commits the row's blocks into the slot's row.
With one slot the staging row is the slot's row itself (no second copy, no commit), and a
conversation that keeps its slot resumes from what the row holds. This class owns the device
state and is driven by one thread; nothing here is thread-safe.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llama2_jax.inference import penalties, step_io
from llama2_jax.inference.adapters import AdapterStack, Limits
from llama2_jax.inference.buckets import Shapes
from llama2_jax.inference.params import TOP_LOGPROBS, SamplingParams
from llama2_jax.inference.sampling import RowSampling, logprobs, mask_rows, sample_rows
from llama2_jax.inference.step_io import Prefix, PromptScores, SlotState, StepOut
from llama2_jax.inference.weights import Weights
from llama2_jax.model import kv_cache, sharding
from llama2_jax.model.kv_cache import Blocks

i32 = jnp.int32


class Slots:
    """`max_slots` decode slots of `length` positions each, over a model's Weights.

    Args:
      weights: the model's Weights (parameters, mesh, per-layer copies).
      max_slots: rows of the decode batch.
      length: positions per slot: a row's prompt plus answer must fit.
      chunk, min_bucket, kv_block, row_growth: the bucket arithmetic's settings
        (llama2_jax.inference.buckets.Shapes; kv_block None: its default for this backend).
      logprobs: steps compute log-probabilities (StepOut.logprob, top_*); off, they are zeros
        (the offline doors, which never report them).
      abstract: allocate nothing (the cache and state are ShapeDtypeStructs): for `lower_steps`
        on weights of ShapeDtypeStructs, e.g. for devices of a TPU topology (llama2_jax.aot).
      adapters: room for LoRA adapters served per row (llama2_jax.inference.adapters); None:
        the base alone.
      kv_quantization: the KV cache's format, "none" (the compute dtype), "int8" or "fp8".
    """

    def __init__(self, weights: Weights, max_slots: int, length: int, *, chunk: int = 256,
                 min_bucket: int = 16, kv_block: int | None = None, row_growth: int = 4,
                 logprobs: bool = True, abstract: bool = False, adapters: Limits | None = None,
                 kv_quantization: str = "none"):
        cfg = weights.config
        if not 0 < length <= cfg.max_seq_len:
            raise ValueError(f"slot length {length} must be in 1..{cfg.max_seq_len}")
        self.shapes = Shapes.make(max_slots, length, chunk=chunk, min_bucket=min_bucket,
                                  kv_block=kv_block, row_growth=row_growth,
                                  backend=weights.platform)
        self.weights, self.config = weights, cfg
        self.max_slots, self.length, self.chunk = max_slots, length, self.shapes.chunk
        self.shared_stage = max_slots == 1  # the staging row is the slot's own row
        self.logprobs, self.abstract = logprobs, abstract
        self._traces = 0  # of every step below
        self._replicated = NamedSharding(weights.mesh, PartitionSpec())
        jit = functools.partial(jax.jit, compiler_options=weights.compiler_options)
        self._decode = jit(self._decode_fn, static_argnames=("rows", "attend"),
                           donate_argnames=("cache", "state"))
        self._prefill = jit(self._prefill_fn, static_argnames=("attend", "score"),
                            donate_argnames=("stage", "state"))
        self._commit = jit(self._commit_fn, static_argnames=("blocks",),
                           donate_argnames=("cache",))
        self._insert = jit(self._insert_fn, donate_argnames=("stage", "state"))
        self._extract = jit(self._extract_fn, static_argnames=("n",))
        self.adapters = AdapterStack(weights, adapters, abstract) if adapters else None
        self.row_adapter = np.zeros(max_slots, np.int32)  # each slot's adapter (0: the base)
        new = functools.partial(step_io.new_cache, weights, self.shapes, abstract=abstract,
                                quantization=kv_cache.check_kv_method(kv_quantization))
        self.cache = new(self.shapes.groups)
        self.stage = self.cache if self.shared_stage else new((1,))
        self.state = step_io.initial_state(max_slots, length, cfg.vocab_size,
                                           self._replicated, abstract)
        self.positions = np.full(max_slots, length, np.int64)  # host mirror; length = idle
        self._staged = (-1, 0)  # (slot, positions) the staging row holds for that slot

    def _abstract(self, x) -> jax.ShapeDtypeStruct:
        return step_io.abstract_like(x, self._replicated)

    def _map_layers(self, fn, *caches):
        """fn over each layer's Blocks (per-layer caches) or over the stacked Blocks."""
        if not self.weights.per_layer:
            return fn(*caches)
        return tuple(fn(*layer) for layer in zip(*caches))

    def _replicate(self, tree):
        return jax.tree.map(lambda x: sharding.constrain(x, (None,) * x.ndim), tree)

    def _out(self, logits, tokens, want_top) -> StepOut:
        if not self.logprobs:  # nothing asks: no log-softmax (nor its compiled code)
            n = min(TOP_LOGPROBS, logits.shape[-1])
            zeros = jnp.zeros(tokens.shape, jnp.float32)
            return self._replicate(StepOut(tokens, zeros, jnp.zeros((*tokens.shape, n), i32),
                                           jnp.zeros((*tokens.shape, n), jnp.float32)))
        return self._replicate(StepOut(tokens, *logprobs(logits, tokens, want_top)))

    # -- the jitted steps --------------------------------------------------------------------
    def _model(self, weights, lora, index):
        """(model, per-layer states) in a step; with adapters, rows use theirs (index [B])."""
        model, unstacked = self.weights.model(weights)
        if self.adapters is None:
            return model, unstacked
        return self.adapters.bind(model, unstacked, lora, self.adapters.select(index))

    def _decode_fn(self, weights, lora, cache, state: SlotState, active, allowed, index,
                   rows: int, attend: int):
        self._traces += 1
        model, unstacked = self._model(weights, lora, None if index is None else index[:rows])
        pen = state.penalties  # [S, V] rows: read and updated in place, not sliced
        live = jax.tree.map(lambda x: x[:rows], state._replace(penalties=None))  # slots
        # 0..rows-1; the rest keep theirs
        act = active[:rows]
        # Idle rows feed at the cache's end (their writes are dropped) and draw greedily: what
        # a released slot last asked for costs the others nothing.
        positions = jnp.where(act, live.positions, self.length)
        s = live.sampling._replace(temperature=jnp.where(act, live.sampling.temperature, 0.0))
        want_top = act & live.want_top
        logits, cache = model(live.tokens[:, None], positions[:, None], cache, attend=attend,
                              unstacked=unstacked, cpu_kernel=self.weights.cpu_kernels)
        logits = logits[:, 0]  # [rows, V]
        penalized = act & pen.on[:rows]
        x = penalties.apply(logits, pen, penalized, s.count)
        x = mask_rows(x, act & jnp.any(allowed[:rows] != 0, axis=-1), allowed[:rows])
        tokens = sample_rows(x, s, self.weights.cpu_kernels)
        live = SlotState(tokens, jnp.minimum(positions + 1, self.length),
                         live.sampling._replace(count=s.count + 1), want_top, None)
        state = jax.tree.map(
            lambda full, part: jax.lax.dynamic_update_slice(full, part, (0,) * full.ndim),
            state._replace(penalties=None), live)
        state = state._replace(penalties=penalties.record(pen, tokens, penalized))
        return (self._out(logits, tokens, want_top), self._replicate(state),
                kv_cache.constrain(cache))

    def _prefill_fn(self, weights, lora, stage, state: SlotState, slot, tokens, start, n, final,
                    temperature, top_p, top_k, min_p, key, want_top, row_penalties, allowed,
                    following, index, attend: int, score: bool = False):
        """Feed tokens [1, T] (the first n real) at positions start.. of the staging row.
        With `score`, also the PromptScores of the chunk (`following`: the token after it)."""
        self._traces += 1
        model, unstacked = self._model(weights, lora, None if index is None else index[None])
        positions = start + jnp.arange(tokens.shape[1], dtype=i32)[None]  # [1, T]
        if score:
            every, stage = model(tokens, positions, stage, attend=attend,
                                 unstacked=unstacked)  # [1, T, V]
            logits = jax.lax.dynamic_index_in_dim(every[0], n - 1, keepdims=True)  # [1, V]
            targets = jnp.roll(tokens[0], -1).at[n - 1].set(following)  # [T]
            scores = PromptScores(*self._replicate(logprobs(every[0], targets,
                                                            jnp.ones((), bool))))
        else:
            logits, stage = model(tokens, positions, stage, logits_at=(n - 1)[None],
                                  attend=attend, unstacked=unstacked)  # [1, V]
        sampling = RowSampling(temperature[None], top_p[None], top_k[None], key[None],
                               jnp.zeros(1, i32), min_p[None])
        x = penalties.apply(logits, row_penalties, row_penalties.on, jnp.zeros(1, i32))
        x = mask_rows(x, jnp.any(allowed != 0)[None], allowed[None])
        first = sample_rows(x, sampling, self.weights.cpu_kernels)
        s = state.sampling

        def put(array, value):
            return array.at[slot].set(value)

        state = SlotState(
            tokens=put(state.tokens, first[0]),
            positions=put(state.positions, jnp.where(final, start + n, self.length)),
            sampling=RowSampling(put(s.temperature, temperature), put(s.top_p, top_p),
                                 put(s.top_k, top_k), put(s.key, key), put(s.count, 1),
                                 put(s.min_p, min_p)),
            want_top=put(state.want_top, want_top),
            penalties=penalties.put(state.penalties, slot, penalties.record(
                row_penalties, first, row_penalties.on)))
        out = (self._out(logits, first, want_top[None]), self._replicate(state),
               kv_cache.constrain(stage))
        return (*out, scores) if score else out

    def _commit_fn(self, cache, stage, slot, blocks: int):
        """The cache with the staging row's first `blocks` position blocks in row `slot`."""
        self._traces += 1
        return kv_cache.constrain(
            self._map_layers(lambda c, s: kv_cache.copy_row(c, s, slot, blocks), cache, stage))

    def _insert_fn(self, stage, state: SlotState, kv, slot):
        """The staging row with a prefix's blocks (copies) in front; `slot` idles until its
        prefill (so a step in between cannot write into the row it is about to get)."""
        self._traces += 1

        def put(st: Blocks, prefix: Blocks) -> Blocks:
            blocks = list(st.groups[0])
            for j, blk in enumerate(prefix.groups[0]):
                blocks[j] = jax.tree.map(jnp.copy, blk)
            return Blocks((tuple(blocks),))

        stage = self._map_layers(put, stage, kv)
        state = state._replace(positions=state.positions.at[slot].set(self.length))
        return kv_cache.constrain(stage), self._replicate(state)

    def _extract_fn(self, cache, slot, n: int):
        """The first n position blocks of row `slot`, one row."""
        self._traces += 1
        return self._map_layers(lambda c: kv_cache.take_row(c, slot, n), cache)

    def _lora(self, index):
        """What a step takes for the adapters: (the stack, a copy of the rows' indices)."""
        return (None, None) if self.adapters is None else (self.adapters.arrays, np.copy(index))

    # -- what the drivers call ---------------------------------------------------------------
    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} out of range 0..{self.max_slots - 1}")

    def prefill(self, slot: int, tokens: Sequence[int], start: int, final: bool,
                params: SamplingParams, allowed=None) -> StepOut:
        """Write `tokens` (at most `chunk`) at positions start.. of `slot`; with `final`, the
        slot starts decoding from the token drawn after them (returned, one row). A prompt's
        chunks come in order from start 0 (or from up to a Prefix's length after `insert`,
        or what `resume` kept), and one slot's prompt is prefilled at a time. `allowed`: the
        bitmask of the tokens the first may be (int32 [mask_words(vocab)]; None: any)."""
        return self._prefill_call(slot, tokens, start, final, params, None, allowed)

    def prefill_scored(self, slot: int, tokens: Sequence[int], start: int, final: bool,
                       params: SamplingParams, following: int,
                       allowed=None) -> tuple[StepOut, PromptScores]:
        """`prefill`, and the log-probabilities of the chunk's tokens after its first and of
        `following` (the prompt's token after the chunk; ignored when `final`): position i
        of the PromptScores scores the token at start + i + 1. A step of its own per chunk
        bucket (logits at every position), compiled when first used or by `warm_up(score=
        True)`."""
        return self._prefill_call(slot, tokens, start, final, params, int(following), allowed)

    def _prefill_call(self, slot, tokens, start, final, params, following, allowed):
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
        padded = np.zeros((1, self.shapes.bucket(n)), np.int32)
        padded[0, :n] = tokens
        score = following is not None
        with jax.set_mesh(self.weights.mesh):
            lora, index = self._lora(self.row_adapter[slot])
            out, self.state, self.stage, *scores = self._prefill(
                self.weights.leaves, lora, self.stage, self.state,
                np.int32(slot), padded, np.int32(start), np.int32(n), np.bool_(final),
                np.float32(params.temperature), np.float32(params.top_p),
                np.int32(params.top_k), np.float32(params.min_p), params.key(),
                np.bool_(params.top_logprobs),
                penalties.of(params, self.config.vocab_size), self._mask(allowed, ()),
                np.int32(following or 0), index,
                attend=self.shapes.attend_bucket(start + n), score=score)
            if self.shared_stage:
                self.cache = self.stage
            elif final:  # the prompt's keys/values into the slot's row, where decode reads
                self.cache = self._commit(self.cache, self.stage, np.int32(slot),
                                          blocks=self.shapes.blocks_for(start + n))
        self._staged = (slot, start + n)
        self.positions[slot] = start + n if final else self.length
        return (out, scores[0]) if score else out

    def release(self, slot: int) -> None:
        """`slot` is free: the next decode steps pass over it (its row keeps the keys/values
        it holds until another prompt is prefilled there)."""
        self._check_slot(slot)
        self.positions[slot] = self.length

    max_adapters = property(lambda self: self.adapters.limits.max_adapters if self.adapters
                            else 0)

    def set_adapter(self, slot: int, index: int) -> None:
        """`slot`'s next prompt and answer run with adapter `index` (0: the base); set before
        its first prefill (a Prefix from another adapter holds another model's keys)."""
        self._check_slot(slot)
        if not 0 <= index <= self.max_adapters:
            raise ValueError(f"adapter index {index} out of range 0..{self.max_adapters}")
        self.row_adapter[slot] = index

    def load_adapter(self, index: int, directory: str) -> None:
        """Put the adapter in `directory` at `index` (1..max_adapters) of the stack, replacing
        what was there (no slot may be using it): AdapterError names what does not fit."""
        if self.adapters is None:
            raise ValueError("these slots were built without room for adapters")
        self.adapters.load(index, directory)

    compile_count = property(lambda self: self._traces + (  # each trace compiles once
        self.adapters.traces if self.adapters else 0))

    def resume(self, slot: int, length: int) -> None:
        """Start `slot`'s next prompt after the first `length` positions its row holds (a
        conversation's earlier turns): its next prefill starts at position `length`."""
        self._check_slot(slot)
        if not 0 < length < self.length:
            raise ValueError(f"resume length {length} must be in 1..{self.length - 1}")
        if self.shared_stage:
            self._staged = (slot, length)
            self.positions[slot] = self.length
        else:
            self.insert(slot, self.extract(slot, length))

    def _mask(self, allowed, rows: tuple[int, ...]) -> np.ndarray:
        return step_io.bitmasks(allowed, rows, self.config.vocab_size)

    def _decode_mask(self, allowed):
        """Bitmasks on the devices, replicated as warm-up's were (the same compiled step)."""
        if allowed is not None:
            return jax.device_put(self._mask(allowed, (self.max_slots,)), self._replicated)
        if not hasattr(self, "_no_masks"):  # on the device once, not sent every step
            self._no_masks = jax.device_put(self._mask(None, (self.max_slots,)),
                                            self._replicated)
        return self._no_masks

    def decode(self, allowed=None) -> StepOut:
        """One step of the slots up to the highest active one (its row bucket), attending over
        the bucket of the longest; the output has a row per computed slot. `allowed`: int32
        [max_slots, W] bitmasks of the tokens each slot may draw (a row of zeros: any; None:
        no slot constrained)."""
        active = self.positions < self.length
        rows, attend = self.shapes.decode_shape(self.positions)
        lora, index = self._lora(self.row_adapter)
        with jax.set_mesh(self.weights.mesh):
            out, self.state, self.cache = self._decode(self.weights.leaves, lora, self.cache,
                                                       self.state, active,
                                                       self._decode_mask(allowed), index,
                                                       rows=rows, attend=attend)
        if self.shared_stage:
            self.stage = self.cache
        self.positions[active] += 1
        return out

    def extract(self, slot: int, length: int) -> Prefix:
        """A copy of the keys/values at positions 0..length-1 of `slot` (a prefix to reuse)."""
        self._check_slot(slot)
        if not 0 < length <= self.length:
            raise ValueError(f"prefix length {length} must be in 1..{self.length}")
        n = self.shapes.blocks_for(length)
        with jax.set_mesh(self.weights.mesh):
            kv = self._extract(self.cache, np.int32(slot), n=n)
        return Prefix(kv, length, n, sum(x.nbytes for x in jax.tree.leaves(kv)))

    def insert(self, slot: int, prefix: Prefix) -> None:
        """Start `slot`'s prompt from a Prefix: its first prefix.length positions are valid
        and the prompt's next chunk is prefilled at prefix.length."""
        self._check_slot(slot)
        with jax.set_mesh(self.weights.mesh):
            self.stage, self.state = self._insert(self.stage, self.state, prefix.kv,
                                                  np.int32(slot))
        if self.shared_stage:
            self.cache = self.stage
        self._staged = (slot, prefix.length)
        self.positions[slot] = self.length

    def prefix_bytes(self, length: int) -> int:
        """Device bytes of a Prefix of `length` positions (whole blocks)."""
        row = sum(x.nbytes for x in jax.tree.leaves(self.stage)) // self.length
        return row * sum(self.shapes.blocks[:self.shapes.blocks_for(length)])

    def warm_up(self, score: bool = False) -> int:
        """Compile every step these slots can need (with `score`, `prefill_scored`'s too);
        returns how many were compiled."""
        before = self.compile_count
        params = SamplingParams()
        for n, start in self.shapes.prefill_shapes():
            self._staged = (0, start)
            self.prefill(0, [0] * n, start, True, params)
            if score:
                self._staged = (0, start)
                self.prefill_scored(0, [0] * n, start, True, params, 0)
        for n in range(1, len(self.shapes.blocks) + 1):
            if not self.shared_stage:
                with jax.set_mesh(self.weights.mesh):
                    self.cache = self._commit(self.cache, self.stage, np.int32(0), blocks=n)
            self.insert(0, self.extract(0, sum(self.shapes.blocks[:n])))
        self._staged = (-1, 0)
        self.release(0)
        for rows, attend in self.shapes.decode_shapes():
            self.positions[rows - 1] = attend - 1  # the highest slot sets the rows
            self.decode()
            self.positions[rows - 1] = self.length
        if self.adapters is not None:
            self.adapters.warm_up()
        jax.block_until_ready((self.cache, self.stage))
        return self.compile_count - before

    def lower_steps(self, every: bool = True) -> list[tuple[str, "jax.stages.Lowered"]]:
        """The steps `warm_up` compiles, lowered on abstract inputs: (name, Lowered). every
        False: only the largest of each kind (the longest chunk over all positions, all
        blocks, every slot over all positions), where memory peaks."""
        a = self._abstract
        i32_, f32_, b_ = a(np.dtype(np.int32)), a(np.dtype(np.float32)), a(np.dtype(bool))
        prefills, decodes = self.shapes.prefill_shapes(), self.shapes.decode_shapes()
        block_counts = range(1, len(self.shapes.blocks) + 1)
        if not every:
            prefills = [max(prefills, key=lambda p: (self.shapes.bucket(p[0]), sum(p)))]
            decodes, block_counts = decodes[-1:], block_counts[-1:]
        out = []
        lora = self.adapters and self.adapters.arrays
        with jax.set_mesh(self.weights.mesh):
            for n, start in prefills:
                t, attend = self.shapes.bucket(n), self.shapes.attend_bucket(start + n)
                out.append((f"prefill {t} tokens, attend {attend}", self._prefill.lower(
                    self.weights.leaves, lora, self.stage, self.state, i32_,
                    a(np.zeros((1, t), np.int32)), i32_, i32_, b_, f32_, f32_, i32_, f32_,
                    a(np.zeros(2, np.uint32)), b_,
                    jax.tree.map(a, penalties.empty(1, self.config.vocab_size)),
                    a(self._mask(None, ())), i32_, lora and i32_,
                    attend=attend)))
            for n in block_counts:
                if not self.shared_stage:
                    out.append((f"commit {n} blocks", self._commit.lower(
                        self.cache, self.stage, i32_, blocks=n)))
                out.append((f"extract {n} blocks", self._extract.lower(self.cache, i32_, n=n)))
                prefix = self._map_layers(lambda st, n=n: Blocks((st.groups[0][:n],)),
                                          self.stage)
                out.append((f"insert {n} blocks", self._insert.lower(
                    self.stage, self.state, prefix, i32_)))
            for rows, attend in decodes:
                out.append((f"decode {rows} rows, attend {attend}", self._decode.lower(
                    self.weights.leaves, lora, self.cache, self.state,
                    a(np.zeros(self.max_slots, bool)), a(self._mask(None, (self.max_slots,))),
                    lora and a(self.row_adapter), rows=rows, attend=attend)))
        return out
