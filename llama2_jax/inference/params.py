"""A request's sampling settings: plain Python (no JAX), so the HTTP layer, the chat config and
the library all spell them one way, with Meta's chat defaults in one place."""

from __future__ import annotations

import dataclasses

import numpy as np

# Meta's chat defaults (llama/example_chat_completion.py).
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.9
TOP_LOGPROBS = 20  # the most alternatives a row may ask for (OpenAI's limit)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one row draws its tokens.

    temperature 0 is greedy; top_k 0 is off; top_p follows Meta's `sample_top_p` (tokens in
    order of probability are kept while the mass before them is at most top_p). A row's n-th
    token is drawn with fold_in(key(seed), n), so it depends on its own seed alone, not on
    what else is batched with it. top_logprobs: the row wants the TOP_LOGPROBS most likely
    tokens of every step.
    """

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = 0
    seed: int = 0
    top_logprobs: bool = False

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is None or int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def key(self) -> np.ndarray:
        """The row's PRNG key (threefry's [hi, lo] words of the seed), made on the host."""
        seed = int(self.seed) & 0xFFFFFFFFFFFFFFFF
        return np.asarray([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


GREEDY = SamplingParams(temperature=0.0, top_p=1.0)


def sampling_params(temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
                    top_k: int | None = None, seed: int = 0) -> SamplingParams:
    """SamplingParams from the keyword arguments the public functions take (top_k None = off)."""
    return SamplingParams(float(temperature), float(top_p), int(top_k or 0), int(seed))
