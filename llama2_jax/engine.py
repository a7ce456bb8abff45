"""Jitted prefill and decode steps, batched generation with stop conditions, streaming.

The KV cache is an explicit pytree (model.KVCache) whose slot s holds position s of its row,
so rows of different lengths share one cache, and a multi-turn `Session` keeps its cache and
re-uses every slot up to the first token that differs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from llama2_jax import sharding
from llama2_jax.kv_cache import Blocks, KVCache
from llama2_jax.model import Transformer, init_cache, unstack_layers
from llama2_jax.sampling import Greedy

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """Tuning values of an Engine (and its Sessions).

    On CPU, models whose layers take at most `unstack_max_bytes` run with a second, per-layer
    copy of the layer weights (see Transformer's `unstacked`): ~1.5x faster decode with caches
    of up to `unstack_max_slots` slots; past that XLA:CPU copies per-layer caches and the scan
    is faster. A Session's cache starts at `session_min_cache` slots and doubles as needed.
    """

    unstack_max_bytes: int = 2 << 30
    unstack_max_slots: int = 1024
    session_min_cache: int = 256


DEFAULT_OPTIONS = EngineOptions()


class ContextError(ValueError):
    """A prompt that does not fit the model's context window."""


def bucket(n: int, limit: int) -> int:
    """Smallest power of two >= n (at least MIN_BUCKET), capped at `limit`."""
    size = MIN_BUCKET
    while size < n:
        size *= 2
    return min(size, limit)


def model_mesh(model: Transformer) -> Mesh:
    """The mesh the model's parameters live on (a 1-device mesh if they are not sharded)."""
    leaf = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
    if isinstance(leaf.sharding, NamedSharding):
        return leaf.sharding.mesh
    return sharding.make_mesh(devices=sorted(leaf.devices(), key=lambda d: d.id))


@dataclasses.dataclass
class Step:
    """One decoding step's output: the new token of each still-running row (None if done)."""

    tokens: list[int | None]
    finished: list[bool]


def _layers_for(cache, unstacked):
    """The per-layer weights when `cache` is per layer (a tuple), else None: scan."""
    return None if isinstance(cache, (KVCache, Blocks)) else unstacked


def cache_length(cache) -> int:
    """Slots of a KVCache, or of a tuple of one-layer KVCaches."""
    return (cache if isinstance(cache, KVCache) else cache[0]).length


class Engine:
    """Compiled prefill/decode for one model; compiles once per (batch, bucket) shape.

    `unstack` runs the layers from a per-layer copy of their weights (None: on CPU, for
    layers of at most `options.unstack_max_bytes`) when the KV cache has at most
    `options.unstack_max_slots` slots; such a cache is a tuple of one-layer caches, a longer
    one is stacked and scanned.
    """

    def __init__(self, model: Transformer, mesh: Mesh | None = None,
                 unstack: bool | None = None, options: EngineOptions = DEFAULT_OPTIONS):
        self.config = model.config
        self.mesh = mesh or model_mesh(model)
        self.options = options
        self._graphdef, self._state = nnx.split(model)
        if unstack is None:
            layer_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model.layers)))
            unstack = (jax.default_backend() == "cpu"
                       and layer_bytes <= options.unstack_max_bytes)
        self._unstacked = unstack_layers(model) if unstack else None
        self.compile_count = 0  # traces of prefill/decode/forward, for tests and benchmarks
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("sampler",),
                                donate_argnames=("cache",))
        self._decode = jax.jit(self._decode_fn, static_argnames=("sampler",),
                               donate_argnames=("cache",))
        self._forward = jax.jit(self._forward_fn)
        self._cache_makers: dict[tuple, Callable] = {}

    # -- jitted bodies -------------------------------------------------------------------------
    def _model(self) -> Transformer:
        return nnx.merge(self._graphdef, self._state)

    def _constrain_cache(self, cache):
        return jax.tree.map(lambda c: sharding.constrain(c, KVCache.axes(c.ndim)), cache)

    def _prefill_fn(self, state, unstacked, tokens, positions, last, cache, rng, sampler):
        self.compile_count += 1
        model = nnx.merge(self._graphdef, state)
        logits, cache = model(tokens, positions, cache, logits_at=last,
                              unstacked=_layers_for(cache, unstacked))  # [B, V]
        return sampler(logits, rng), logits, self._constrain_cache(cache)

    def _decode_fn(self, state, unstacked, tokens, positions, cache, key, step, sampler):
        self.compile_count += 1
        model = nnx.merge(self._graphdef, state)
        logits, cache = model(tokens[:, None], positions[:, None], cache,
                              unstacked=_layers_for(cache, unstacked))  # [B, 1, V]
        next_tokens = sampler(logits[:, 0], jax.random.fold_in(key, step))
        # Rows that have stopped keep stepping; clamped, they rewrite their last slot.
        last_slot = cache_length(cache) - 1
        next_positions = sharding.constrain(jnp.minimum(positions + 1, last_slot), (None,))
        return next_tokens, next_positions, self._constrain_cache(cache)

    def _forward_fn(self, state, unstacked, tokens, positions):
        self.compile_count += 1
        return nnx.merge(self._graphdef, state)(tokens, positions, unstacked=unstacked)[0]

    # -- building blocks -----------------------------------------------------------------------
    def _per_layer(self, length: int) -> bool:
        """Whether a cache of `length` slots is kept per layer (and the layers unstacked)."""
        return self._unstacked is not None and length <= self.options.unstack_max_slots

    def _cache_shape(self, batch: int, length: int) -> tuple[int, ...]:
        """One array's shape: [L, B, K, S, H]; per layer without its size-1 dimensions
        ([B, K, S, H], or [K, S, H] for one row: see llama2_jax.kv_cache)."""
        cfg = self.config
        if not self._per_layer(length):
            return (cfg.n_layers, batch, cfg.n_kv_heads, length, cfg.head_dim)
        return (batch,) * (batch > 1) + (cfg.n_kv_heads, length, cfg.head_dim)

    def _cache_shardings(self, batch: int, length: int):
        shape = self._cache_shape(batch, length)
        s = sharding.named_sharding(self.mesh, KVCache.axes(len(shape)), shape)
        if self._per_layer(length):
            return tuple([KVCache(s, s)] * self.config.n_layers)
        return KVCache(s, s)

    def new_cache(self, batch: int, length: int):
        """A zeroed cache for `batch` rows of `length` slots, created in its shards."""
        make = self._cache_makers.get((batch, length))
        if make is None:
            cfg = self.config
            shape = self._cache_shape(batch, length)

            def init():
                if self._per_layer(length):
                    return tuple(KVCache(*[jnp.zeros(shape, cfg.compute_dtype)] * 2)
                                 for _ in range(cfg.n_layers))
                return init_cache(cfg, batch, length)

            make = jax.jit(init, out_shardings=self._cache_shardings(batch, length))
            self._cache_makers[(batch, length)] = make
        return make()

    def grow_cache(self, cache, length: int):
        """A copy of `cache` with its slots extended to `length` (stacked if it gets long)."""
        first = cache if isinstance(cache, KVCache) else cache[0]
        batch, old = first.rows, first.length
        make = self._cache_makers.get(("grow", batch, old, length))
        if make is None:
            def grow(c):
                if not isinstance(c, KVCache) and not self._per_layer(length):
                    c = KVCache(*(jnp.stack([x.reshape(batch, *x.shape[-3:]) for x in parts])
                                  for parts in zip(*c)))  # [L, B, K, S, H]

                def pad(x):
                    widths = [(0, 0)] * x.ndim
                    widths[-2] = (0, length - old)
                    return jnp.pad(x, widths)
                return jax.tree.map(pad, c)

            make = jax.jit(grow, out_shardings=self._cache_shardings(batch, length))
            self._cache_makers[("grow", batch, old, length)] = make
        return make(cache)

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits [T, V] (float32) of one sequence, no cache."""
        n = len(tokens)
        if not 0 < n <= self.config.max_seq_len:
            raise ContextError(f"sequence of {n} tokens; expected 1..{self.config.max_seq_len}")
        t = bucket(n, self.config.max_seq_len)
        padded = np.zeros((1, t), np.int32)
        padded[0, :n] = tokens
        with jax.set_mesh(self.mesh):
            logits = self._forward(self._state, self._unstacked, jnp.asarray(padded),
                                   jnp.arange(t, dtype=jnp.int32)[None])
        return np.asarray(logits[0, :n])

    def prefill(self, rows: Sequence[Sequence[int]], starts: Sequence[int], cache, rng,
                sampler):
        """Write rows[b] at positions starts[b].. into the cache; sample each row's next token.

        Returns (next tokens [B] on device, last logits [B, V], cache).
        """
        lengths = [len(r) for r in rows]
        end = max(s + n for s, n in zip(starts, lengths))
        if end > cache_length(cache):
            raise ContextError(f"prefill up to position {end} does not fit a cache of "
                               f"{cache_length(cache)}")
        t = bucket(max(lengths), self.config.max_seq_len)  # padding past the cache is dropped
        tokens = np.zeros((len(rows), t), np.int32)
        for b, r in enumerate(rows):
            tokens[b, :len(r)] = r
        positions = np.asarray(starts, np.int32)[:, None] + np.arange(t, dtype=np.int32)
        last = np.asarray(lengths, np.int32) - 1
        with jax.set_mesh(self.mesh):
            return self._prefill(self._state, self._unstacked, jnp.asarray(tokens),
                                 jnp.asarray(positions),
                                 jnp.asarray(last), cache, rng, sampler=sampler)

    def decode(self, tokens, positions, cache, key, step: int, sampler):
        """Feed tokens [B] at positions [B], sampling with `fold_in(key, step)`.

        Returns (next tokens [B], next positions [B], cache), all on device: a decode loop
        needs no host work but reading the tokens.
        """
        with jax.set_mesh(self.mesh):
            return self._decode(self._state, self._unstacked, tokens, positions, cache, key,
                                np.int32(step), sampler=sampler)

    # -- generation ----------------------------------------------------------------------------
    def stream(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               sampler: Callable = Greedy(), seed: int = 0, stop_ids: Sequence[int] = (),
               cache=None, starts: Sequence[int] | None = None,
               on_cache: Callable | None = None) -> Iterator[Step]:
        """Generate for a batch of token-id prompts, yielding one Step per decoded position.

        A row stops at a token in `stop_ids` (not yielded), after `max_new_tokens`, or when
        prompt + answer reach the context limit. With `cache`/`starts`, each prompt continues
        a sequence whose first starts[b] positions are already in the cache; `on_cache`
        receives the cache after every step (it is donated to the next one).
        """
        cfg = self.config
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        starts = [0] * len(prompts) if starts is None else list(starts)
        ends = [s + len(p) for s, p in zip(starts, prompts)]
        context = cfg.max_seq_len if cache is None else min(cfg.max_seq_len, cache_length(cache))
        if max(ends) > context:
            raise ContextError(f"prompt of {max(ends)} tokens exceeds the context of "
                               f"{context} tokens")
        budget = [min(max_new_tokens, context - e) for e in ends]
        if cache is None:
            # Slots for every token fed: the prompt padded to its bucket, then the answer. A
            # function of the bucket alone, so prompts in one bucket share compiled steps.
            need = bucket(max(len(p) for p in prompts), context) + max_new_tokens
            cache = self.new_cache(len(prompts), bucket(need, context))
        key = jax.random.PRNGKey(seed)
        tok, _, cache = self.prefill(prompts, starts, cache, jax.random.fold_in(key, 0), sampler)
        if on_cache:
            on_cache(cache)
        stop = set(int(s) for s in stop_ids)
        count = [0] * len(prompts)
        done = [b <= 0 for b in budget]
        # Placed as the decode step returns them, so its first call does not compile twice.
        positions = jax.device_put(np.minimum(ends, cache_length(cache) - 1).astype(np.int32),
                                   NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
        step = 0
        while not all(done):
            step += 1
            # Dispatch the next step before reading this one's tokens, so the device works
            # while the host checks stop conditions.
            nxt, positions, cache = self.decode(tok, positions, cache, key, step, sampler)
            if on_cache:
                on_cache(cache)
            host = np.asarray(tok)
            out: list[int | None] = []
            for b, t in enumerate(host.tolist()):
                if done[b]:
                    out.append(None)
                    continue
                if t in stop:
                    done[b] = True
                    out.append(None)
                    continue
                out.append(t)
                count[b] += 1
                done[b] = count[b] >= budget[b]
            yield Step(out, list(done))
            tok = nxt

    def generate(self, prompts: Sequence[Sequence[int]], **kwargs) -> list[list[int]]:
        """The new tokens of each prompt (stop token excluded); see `stream` for arguments."""
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.stream(prompts, **kwargs):
            for b, t in enumerate(step.tokens):
                if t is not None:
                    out[b].append(t)
        return out


class Session:
    """One conversation whose KV cache lives across turns.

    Each `generate` call receives the whole token sequence so far (e.g. a dialog in the chat
    format); only the tokens after the longest prefix already in the cache are prefilled. The
    cache grows in power-of-two steps (from the engine's `options.session_min_cache` slots) as
    the conversation does:
    each decode step reads every slot, so a short chat in a 4096-token context stays fast.
    """

    def __init__(self, engine: Engine, length: int | None = None):
        self.engine = engine
        self.length = length or engine.config.max_seq_len
        self.cache = None  # KVCache, or a tuple of one-layer ones (unstacked engines)
        self.cached: list[int] = []  # tokens whose keys/values are valid in the cache

    def reset(self) -> None:
        self.cached = []

    def generate(self, tokens: Sequence[int], *, max_new_tokens: int, sampler=Greedy(),
                 seed: int = 0, stop_ids: Sequence[int] = ()) -> Iterator[int]:
        tokens = list(tokens)
        if len(tokens) >= self.length:
            raise ContextError(f"{len(tokens)} tokens leave no room to answer in a context of "
                               f"{self.length}")
        size = max(min(self.engine.options.session_min_cache, self.length),
                   bucket(len(tokens) + max_new_tokens, self.length))
        if self.cache is None or jax.tree.leaves(self.cache)[0].is_deleted():
            self.cache, self.cached = self.engine.new_cache(1, size), []
        elif cache_length(self.cache) < size:
            self.cache = self.engine.grow_cache(self.cache, size)
        keep = 0
        for a, b in zip(self.cached, tokens[:-1]):  # at least one token must be prefilled
            if a != b:
                break
            keep += 1
        self.cached = tokens[:keep]  # valid until the new tokens overwrite the rest
        answer: list[int] = []
        steps = self.engine.stream([tokens[keep:]], starts=[keep], cache=self.cache,
                                   max_new_tokens=max_new_tokens, sampler=sampler, seed=seed,
                                   stop_ids=stop_ids, on_cache=self._set_cache)
        try:
            for step in steps:
                t = step.tokens[0]
                if t is not None:
                    answer.append(t)
                    yield t
        finally:  # also when the caller stops early (Ctrl-C closes the generator)
            # The cache holds every token fed so far: the prompt and all but the newest.
            self.cached = tokens + answer[:-1]

    def _set_cache(self, cache) -> None:
        self.cache = cache
