"""What the scheduler's callers hand it and get back: a Request, the events it delivers (Token,
PromptLogprobs, Done), the errors of submitting one, and what an Observer is told. Plain
Python: the HTTP side imports these without JAX."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Protocol, Sequence

from llama2_jax.inference.params import SamplingParams


def mask_words(vocab_size: int) -> int:
    """int32 words of an allowed-token bitmask (bit t % 32 of word t // 32: token t)."""
    return (vocab_size + 31) // 32


class Constraint(Protocol):
    """A request's grammar (llama2_jax.serve.grammar.Grammar): which tokens may come next,
    as a bitmask, and the tokens drawn. Called on the scheduler's thread only."""

    def fill_mask(self, out) -> None: ...  # out: int32 [mask_words(vocab)], written
    def consume(self, token: int) -> bool: ...  # False: the grammar refuses it

    @property
    def complete(self) -> bool: ...  # only the end may follow


class ContextError(ValueError):
    """A prompt (and its answer) that does not fit the context."""


class QueueFull(RuntimeError):
    """The wait queue is full: try again later (HTTP 429)."""


class ShuttingDown(RuntimeError):
    """The scheduler accepts no new requests (HTTP 503)."""


@dataclasses.dataclass(frozen=True)
class Token:
    id: int
    logprob: float
    top: tuple[tuple[int, float], ...] | None  # (token id, logprob) most likely first


@dataclasses.dataclass(frozen=True)
class PromptLogprobs:
    """Log-probabilities of prompt tokens start+1 .. start+len(logprobs) (each under the
    model given the tokens before it), and each one's TOP_LOGPROBS alternatives
    ((token id, logprob), most likely first). A scored request gets these, in order, before
    its first Token: together they cover every prompt token after the first."""

    start: int
    logprobs: tuple[float, ...]
    top: tuple[tuple[tuple[int, float], ...], ...]


@dataclasses.dataclass(frozen=True)
class Done:
    """The last event of a request. reason: stop (EOS) | length (max_tokens or the slot's end)
    | cancelled | abort (shut down before it finished) | error (then `error` says why)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    error: str | None = None


Event = Token | PromptLogprobs | Done


class Observer(Protocol):
    """What the loop reports as it goes (the server's Prometheus metrics implement it)."""

    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def finished(self, done: Done) -> None: ...
    def prefix_lookup(self, prompt_tokens: int, hit_tokens: int) -> None: ...


class Quiet:
    def first_token(self, seconds): pass
    def inter_token(self, seconds): pass
    def finished(self, done): pass
    def prefix_lookup(self, prompt_tokens, hit_tokens): pass


_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class Request:
    """One generation: `prompt` token ids, up to `max_tokens` new ones, stopping at a token of
    `stop_ids` (not delivered). `sink` receives the events; `cancel()` ends it early.
    `reuse`: the first `reuse` prompt tokens are already in the row of the slot the request
    gets (a conversation's earlier turns in a one-slot scheduler: see `Session`).
    `score_prompt`: the request gets PromptLogprobs (its prompt is prefilled in full, never
    from the prefix cache), and the stop token that ends it as a Token too. max_tokens 0: no
    answer token is delivered. `constraint`: each token is drawn from what it allows; the
    request ends ("stop") when its grammar is complete. `adapter`: the name of a LoRA adapter
    the scheduler holds (llama2_jax.inference.adapter_names), "" for the base model."""

    prompt: Sequence[int]
    max_tokens: int
    sink: Callable[[list[Event]], None]
    params: SamplingParams = SamplingParams()
    stop_ids: frozenset[int] = frozenset({2})
    reuse: int = 0
    score_prompt: bool = False
    constraint: Constraint | None = None
    adapter: str = ""
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    # set by the loop
    arrival: float = 0.0
    slot: int | None = None
    cursor: int = 0  # prompt tokens in the slot's cache
    cached: int = 0  # of them, copied from the prefix cache
    looked_up: bool = False
    generated: list[int] = dataclasses.field(default_factory=list)
    last_time: float = 0.0
    done: bool = False
    lora: object = None  # the adapter_names.Loaded it holds (released when done)

    def cancel(self) -> None:
        self.cancelled = True
