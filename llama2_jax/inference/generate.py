"""The offline doors over the one device stepper (llama2_jax.inference.slots): `Engine.stream`
and `generate` run a batch of prompts as rows of a Slots through the server's own scheduler
(a batch larger than the slots queues), `Session` is a conversation that keeps its slot across
turns, and `forward` is the cache-free pass. Same stepper, sampler and cache as the server, so
the same prompt, settings and seed give the same tokens through every door.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama2_jax.inference.buckets import pow2_at_least
from llama2_jax.inference.params import SamplingParams
from llama2_jax.inference.requests import ContextError, Done, Request, Token
from llama2_jax.inference.scheduler import Scheduler
from llama2_jax.inference.slots import Slots
from llama2_jax.inference.weights import DEFAULT_OPTIONS, EngineOptions, Weights
from llama2_jax.model.transformer import Transformer

__all__ = ["ContextError", "Engine", "Session", "Step"]

MIN_LENGTH = 256  # the shortest slots `stream` makes: short prompts share compiled steps


@dataclasses.dataclass
class Step:
    """One decoding step's output: the new token of each still-running row (None if none)."""

    tokens: list[int | None]
    finished: list[bool]


def healthy(slots: Slots | None) -> bool:
    """Whether `slots` can step (an interrupt between a donating call and its return leaves
    its device state deleted: the slots are then made anew)."""
    return slots is not None and not any(
        x.is_deleted() for x in jax.tree.leaves((slots.cache, slots.state)))


def run(slots: Slots, requests: Sequence[Request], events: Sequence[collections.deque]):
    """Step `requests` on `slots` to the end; yields after every scheduler step. Closing the
    generator early cancels what is left, so the slots are free for the next call."""
    sched = Scheduler(lambda: slots, length=slots.length, vocab_size=slots.config.vocab_size,
                      max_queue=len(requests))
    sched.open()
    for r in requests:
        sched.submit(r)
    try:
        while sched.busy:
            sched.step()
            yield
    finally:
        for r in requests:
            r.cancel()
        while sched.busy:
            sched.step()


class Engine:
    """A model's door for offline generation: its Weights, and the Slots it steps them with.

    Args:
      model: the Transformer; mesh: where its parameters live (None: theirs).
      unstack: per-layer weight copies (None: on CPU for small enough layers).
      max_batch: the most rows a `stream` steps at once; more prompts wait for a free slot.
    """

    def __init__(self, model: Transformer, mesh: Mesh | None = None,
                 unstack: bool | None = None, options: EngineOptions = DEFAULT_OPTIONS,
                 max_batch: int = 16, kv_quantization: str = "none"):
        self.weights = Weights(model, mesh, unstack, options, fuse=True)
        self.kv_quantization = kv_quantization
        self.config, self.mesh = model.config, self.weights.mesh
        self.max_batch = max_batch
        self._slots: collections.OrderedDict[tuple[int, int], Slots] = collections.OrderedDict()
        self._retired_compiles = 0
        self._forward_compiles = 0
        self._forward = jax.jit(self._forward_fn,
                                compiler_options=self.weights.compiler_options)

    @property
    def compile_count(self) -> int:
        """Steps compiled by this engine (forward, and every Slots it made)."""
        return (self._forward_compiles + self._retired_compiles
                + sum(s.compile_count for s in self._slots.values()))

    def slots(self, max_slots: int, length: int) -> Slots:
        """The engine's Slots of this shape, made on first use; the two most recent shapes are
        kept (with their compiled steps), older ones freed."""
        key = (max_slots, length)
        slots = self._slots.pop(key, None)
        if not healthy(slots):
            if slots is not None:
                self._retired_compiles += slots.compile_count
            slots = Slots(self.weights, max_slots, length, logprobs=False,
                          kv_quantization=self.kv_quantization)
        self._slots[key] = slots
        while len(self._slots) > 2:
            self._retired_compiles += self._slots.popitem(last=False)[1].compile_count
        return slots

    def _forward_fn(self, leaves, tokens, positions):
        self._forward_compiles += 1
        model, unstacked = self.weights.model(leaves)
        return model(tokens, positions, unstacked=unstacked)[0]

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits [T, V] (float32) of one sequence, no cache."""
        n = len(tokens)
        if not 0 < n <= self.config.max_seq_len:
            raise ContextError(f"sequence of {n} tokens; expected 1..{self.config.max_seq_len}")
        t = min(pow2_at_least(n, 16), self.config.max_seq_len)
        padded = np.zeros((1, t), np.int32)
        padded[0, :n] = tokens
        with jax.set_mesh(self.mesh):
            logits = self._forward(self.weights.leaves, jnp.asarray(padded),
                                   jnp.arange(t, dtype=jnp.int32)[None])
        return np.asarray(logits[0, :n])

    def stream(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               params: SamplingParams = SamplingParams(),
               stop_ids: Sequence[int] = ()) -> Iterator[Step]:
        """Generate for a batch of token-id prompts, yielding a Step whenever rows get tokens.

        Row b samples with `params` and seed params.seed + b (as the server's n choices do). A
        row stops at a token in `stop_ids` (not yielded), after `max_new_tokens`, or when
        prompt + answer reach the context limit.
        """
        cfg = self.config
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        if longest > cfg.max_seq_len:
            raise ContextError(f"prompt of {longest} tokens exceeds the context of "
                               f"{cfg.max_seq_len} tokens")
        length = min(pow2_at_least(longest + max_new_tokens, MIN_LENGTH), cfg.max_seq_len)
        slots = self.slots(min(pow2_at_least(len(prompts), 1), self.max_batch), length)
        events = [collections.deque() for _ in prompts]
        requests, finished = {}, [False] * len(prompts)
        for b, p in enumerate(prompts):
            budget = min(max_new_tokens, length - len(p))
            if budget <= 0:  # the prompt fills the context: nothing to answer
                finished[b] = True
                continue
            requests[b] = Request(list(p), budget, events[b].extend,
                                  dataclasses.replace(params, seed=params.seed + b),
                                  frozenset(int(s) for s in stop_ids))
        steps = run(slots, list(requests.values()), events)
        try:
            for _ in steps:
                while any(events):
                    tokens: list[int | None] = [None] * len(prompts)
                    for b, queue in enumerate(events):
                        while queue:
                            e = queue.popleft()
                            if isinstance(e, Token):
                                tokens[b] = e.id
                                break
                            if e.reason == "error":
                                raise RuntimeError(f"generation failed: {e.error}")
                            finished[b] = True
                    yield Step(tokens, list(finished))
        finally:
            steps.close()

    def generate(self, prompts: Sequence[Sequence[int]], **kwargs) -> list[list[int]]:
        """The new tokens of each prompt (stop token excluded); see `stream` for arguments."""
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.stream(prompts, **kwargs):
            for b, t in enumerate(step.tokens):
                if t is not None:
                    out[b].append(t)
        return out


class Session:
    """One conversation that keeps its slot (a one-slot Slots of `length` positions) across
    turns.

    Each `generate` call receives the whole token sequence so far (e.g. a dialog in the chat
    format); only the tokens after the longest prefix its slot already holds are prefilled.
    Decode steps attend over the positions in use, not the whole context.
    """

    def __init__(self, engine: Engine, length: int | None = None):
        self.engine = engine
        self.length = length or engine.config.max_seq_len
        self.slots: Slots | None = None
        self.cached: list[int] = []  # tokens whose keys/values are valid in the slot's row
        self.reused = 0  # of the last turn's prompt, tokens the slot already held

    @property
    def compile_count(self) -> int:
        return self.slots.compile_count if self.slots is not None else 0

    def reset(self) -> None:
        self.cached = []

    def generate(self, tokens: Sequence[int], *, max_new_tokens: int,
                 params: SamplingParams = SamplingParams(),
                 stop_ids: Sequence[int] = ()) -> Iterator[int]:
        """The answer's tokens as they are drawn (the stop token excluded)."""
        tokens = list(tokens)
        if len(tokens) >= self.length:
            raise ContextError(f"{len(tokens)} tokens leave no room to answer in a context of "
                               f"{self.length}")
        if not healthy(self.slots):
            self.slots, self.cached = Slots(self.engine.weights, 1, self.length, logprobs=False), []
        keep = 0
        for a, b in zip(self.cached, tokens[:-1]):  # at least one token must be prefilled
            if a != b:
                break
            keep += 1
        self.cached = tokens[:keep]  # valid until the new tokens overwrite the rest
        self.reused = keep
        events: collections.deque = collections.deque()
        request = Request(tokens, min(max_new_tokens, self.length - len(tokens)), events.extend,
                          params, frozenset(int(s) for s in stop_ids), reuse=keep)
        steps = run(self.slots, [request], [events])
        answer: list[int] = []
        done = None
        try:
            for _ in steps:
                while events:
                    e = events.popleft()
                    if isinstance(e, Done):
                        done = e
                        if e.reason == "error":
                            raise RuntimeError(f"generation failed: {e.error}")
                        continue
                    answer.append(e.id)
                    yield e.id
        finally:  # also when the caller stops early (Ctrl-C closes the generator)
            steps.close()
            # The row holds every token fed so far: the prompt, and the answer but for its
            # newest token (all of it when the answer ended at a stop token: each was fed).
            fed = answer if done is not None and done.reason == "stop" else answer[:-1]
            self.cached = tokens + fed if healthy(self.slots) else []
