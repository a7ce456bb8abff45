"""One HTTP request's generations: its choices submitted to the scheduler, their tokens turned
into text (stop strings, whole characters), logprobs and finish reasons, on the event loop.

The device thread hands events to `Generation.sink`, which moves them onto the event loop;
nothing here calls JAX.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import AsyncIterator, Sequence

from llama2_jax.inference.adapter_names import UnknownAdapter
from llama2_jax.inference.params import SamplingParams
from llama2_jax.inference.requests import (Done, PromptLogprobs, QueueFull, Request,
                                           ShuttingDown, Token)
from llama2_jax.inference.scheduler import Scheduler
from llama2_jax.serve.grammar import Grammar
from llama2_jax.serve.text import TextStream, logprob_texts
from llama2_jax.tokenizer import Tokenizer

FINISH = {"stop": "stop", "length": "length"}


class APIError(Exception):
    """An OpenAI-style error response: status, message, type, param, code."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers


@dataclasses.dataclass
class Update:
    """New output of one choice: text, the tokens behind it, and its end (if it ended)."""

    index: int
    text: str
    tokens: list[Token]
    finish_reason: str | None = None


@dataclasses.dataclass(eq=False)
class Choice:
    index: int
    prompt: Sequence[int]
    request: Request
    text: TextStream
    tokens: list[Token] = dataclasses.field(default_factory=list)
    unsent: list[Token] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0
    prompt_scores: list[PromptLogprobs] = dataclasses.field(default_factory=list)


class Generation:
    """The choices of one request: `len(prompts) * n`, choice i = prompt i // n.

    Args:
      scheduler: where the choices run.
      tokenizer: for their text.
      prompts: token ids of each prompt.
      n: choices per prompt; choice i (of all prompts' choices) draws with seed + i, as
        row i of `generate` does.
      max_tokens: the most new tokens per choice.
      params: sampling settings (the seed of the first choice).
      stops: stop strings (not returned).
      stop_ids: tokens that end a choice (not returned); default the tokenizer's EOS.
      score_prompt: the choices get their prompt tokens' log-probabilities (`echo`).
      grammar: what every choice's tokens must follow (each choice gets its own copy).
      adapter: the LoRA adapter the choices run with ("" for the base model).
    """

    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer, prompts: list[list[int]],
                 n: int, max_tokens: int, params: SamplingParams, stops: Sequence[str],
                 stop_ids: frozenset[int] | None = None, score_prompt: bool = False,
                 grammar: Grammar | None = None, adapter: str = ""):
        self.scheduler, self.tokenizer = scheduler, tokenizer
        self.prompts, self.n = prompts, n
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.choices: list[Choice] = []
        for i, prompt in enumerate(prompts):
            for j in range(n):
                index = i * n + j
                s = dataclasses.replace(params, seed=params.seed + index, prompt_tokens=tuple(
                    sorted(set(prompt))) if params.repetition_penalty != 1 else ())
                request = Request(prompt, max_tokens, sink=self._sink(index), params=s,
                                  stop_ids=frozenset({tokenizer.eos_id}) if stop_ids is None
                                  else stop_ids, score_prompt=score_prompt,
                                  constraint=None if grammar is None
                                  else grammar if index == 0 else grammar.copy(),
                                  adapter=adapter)
                self.choices.append(Choice(index, prompt, request, TextStream(tokenizer, stops)))

    def _sink(self, index: int):
        def sink(events):  # on the device thread
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, events))
        return sink

    def submit(self) -> None:
        """Queue every choice, or none (429 when the queue is full, 503 when shutting down)."""
        try:
            for c in self.choices:
                self.scheduler.submit(c.request)
        except QueueFull as e:
            self.cancel()
            raise APIError(429, f"the server is busy ({e}); retry later",
                           type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except ShuttingDown as e:
            self.cancel()
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        except UnknownAdapter as e:  # unloaded since the request was checked
            self.cancel()
            raise APIError(404, f"the LoRA adapter '{e.args[0]}' was unloaded", param="model",
                           code="model_not_found") from None

    def cancel(self) -> None:
        for c in self.choices:
            self.scheduler.cancel(c.request)

    @property
    def usage(self) -> dict:
        """OpenAI's usage: each prompt counted once (not once per choice)."""
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.tokens) for c in self.choices)
        cached = sum(max(c.cached_tokens for c in self.choices[i * self.n:(i + 1) * self.n])
                     for i in range(len(self.prompts)))
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    async def updates(self, disconnected=None) -> AsyncIterator[Update]:
        """Updates until every choice has finished; cancels what runs if the caller stops.

        `disconnected`: an async callable polled while waiting (non-streaming requests).
        Raises APIError when the server aborts or fails a choice.
        """
        running = len(self.choices)
        try:
            while running:
                try:
                    index, events = await asyncio.wait_for(self.queue.get(), 0.5)
                except asyncio.TimeoutError:
                    if disconnected is not None and await disconnected():
                        return
                    continue
                c = self.choices[index]
                for e in events:
                    update = self._apply(c, e)
                    if update is not None:
                        if update.finish_reason is not None:
                            running -= 1
                        yield update
        finally:
            if running:
                self.cancel()

    def _apply(self, c: Choice, e) -> Update | None:
        if c.finish_reason is not None:
            return None  # ended at a stop string: the rest was cancelled
        if isinstance(e, PromptLogprobs):  # they all come before the first Token
            c.prompt_scores.append(e)
            return None
        if isinstance(e, Token):
            c.tokens.append(e)
            c.unsent.append(e)
            piece = c.text.push(e.id)
            if c.text.stopped:
                self.scheduler.cancel(c.request)
                return self._flush(c, piece, "stop")
            return self._flush(c, piece) if piece else None
        assert isinstance(e, Done)
        c.cached_tokens = e.cached_tokens
        if e.reason == "abort":
            raise APIError(503, "the server shut down before the answer was complete",
                           type="server_error", code="shutting_down")
        if e.reason == "error":
            raise APIError(500, f"generation failed: {e.error}", type="server_error")
        # "cancelled" reaches here only if the server cancelled it itself: a stop
        return self._flush(c, c.text.finish(), FINISH.get(e.reason, "stop"))

    def _flush(self, c: Choice, piece: str, finish: str | None = None) -> Update:
        tokens, c.unsent = c.unsent, []
        if finish is not None:
            c.finish_reason = finish
        return Update(c.index, piece, tokens, finish)

    # -- logprobs in OpenAI's two formats ----------------------------------------------------
    def chat_logprobs(self, tokens: list[Token], top: int, at_start: bool) -> list[dict]:
        """`at_start`: the tokens begin the answer (see `logprob_texts`)."""
        out = []
        texts = logprob_texts(self.tokenizer, [t.id for t in tokens], at_start)
        for t, (text, raw) in zip(tokens, texts):
            alternatives = []
            for tid, lp in (t.top or ())[:top]:
                (ttext, traw), = logprob_texts(self.tokenizer, [tid], at_start)
                alternatives.append({"token": ttext, "logprob": lp, "bytes": traw})
            out.append({"token": text, "logprob": t.logprob, "bytes": raw,
                        "top_logprobs": alternatives})
            at_start = False
        return out

    def completion_logprobs(self, tokens: list[Token], top: int, offset: int,
                            at_start: bool) -> dict:
        """`offset`: where the first token's text starts in the choice's text."""
        ids = [t.id for t in tokens]
        top_lps = [{self._text(tid, at_start and i == 0): lp for tid, lp in (t.top or ())[:top]}
                   for i, t in enumerate(tokens)]
        return self._logprobs(ids, [t.logprob for t in tokens], top_lps, offset, at_start)

    def echo_logprobs(self, c: Choice, top: int) -> dict:
        """The logprobs object of c's prompt (`echo`): its first token has none (null)."""
        lps: list[float | None] = [None]
        tops: list[dict | None] = [None]
        for e in c.prompt_scores:
            lps += e.logprobs
            tops += [{self._text(tid, False): lp for tid, lp in alts[:top]} for alts in e.top]
        if len(lps) != len(c.prompt):
            raise APIError(500, f"the prompt's log-probabilities cover {len(lps)} of its "
                           f"{len(c.prompt)} tokens", type="server_error")
        return self._logprobs(c.prompt, lps, tops, 0, True)

    def dropped_space(self, token: int) -> str:
        """The leading space SentencePiece's decode drops from `token` when it begins a
        text ("" when none): an answer shown after its prompt (`echo`) gets it back."""
        return " " if self._text(token, False) == " " + self._text(token, True) else ""

    def _text(self, token: int, at_start: bool) -> str:
        return logprob_texts(self.tokenizer, [token], at_start)[0][0]

    def _logprobs(self, ids, lps, tops, offset: int, at_start: bool) -> dict:
        texts = [text for text, _ in logprob_texts(self.tokenizer, ids, at_start)]
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        return {"tokens": texts, "token_logprobs": list(lps), "top_logprobs": tops,
                "text_offset": offsets}


def join_logprobs(first: dict, second: dict) -> dict:
    """Two logprobs objects of consecutive text, as one."""
    return {k: first[k] + second[k] for k in first}


def random_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")
