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

    Penalties and biases, applied in vLLM's order to the logits a token is drawn from (the
    reported log-probabilities stay the model's): `min_tokens` holds back the `banned`
    tokens (the request's stop ids) until that many were drawn; `logit_bias` (token id,
    -100..100) is added; `repetition_penalty` (CTRL / Hugging Face: a positive logit divided
    by it, a negative one multiplied) hits every token of `prompt_tokens` (the prompt's ids)
    and of the answer; `frequency_penalty` x count and `presence_penalty` (OpenAI's, over
    the answer's tokens) are subtracted. `min_p` (after temperature) keeps the tokens at
    least min_p times as probable as the most probable one, with top-k and top-p: a token
    is drawn from what all three keep.
    """

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = 0
    seed: int = 0
    top_logprobs: bool = False
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    banned: tuple[int, ...] = ()
    prompt_tokens: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is None or int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= 10:
            raise ValueError("repetition_penalty must be in (0, 10] (1 = off), got "
                             f"{self.repetition_penalty}")
        if self.min_tokens is None or int(self.min_tokens) != self.min_tokens or \
                self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens}")
        # Lists (from JSON) become tuples, so the settings stay hashable and comparable.
        object.__setattr__(self, "logit_bias",
                           tuple((int(t), float(b)) for t, b in self.logit_bias))
        object.__setattr__(self, "banned", tuple(int(t) for t in self.banned))
        object.__setattr__(self, "prompt_tokens", tuple(int(t) for t in self.prompt_tokens))
        for t, b in self.logit_bias:
            if not -100 <= b <= 100:
                raise ValueError(f"logit_bias of token {t} must be in [-100, 100], got {b}")

    @property
    def penalized(self) -> bool:
        """Whether a penalty, bias or min_tokens changes the logits this row draws from."""
        return bool(self.presence_penalty or self.frequency_penalty or self.min_tokens or
                    self.repetition_penalty != 1 or self.logit_bias)

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
