"""Structured output: JSON (OpenAI's `response_format`), regular expressions, choices and Lark
grammars (vLLM's `guided_*` extensions), by llguidance.

llguidance was chosen over xgrammar and outlines-core (benchmarks/bench_grammar.py, on this
vocabulary): its per-request compile is about 1 ms (xgrammar's 6-10 ms per new schema,
outlines-core's 0.2-13 s), its masks were the only ones exact in that run (the others refused
valid tokens or allowed invalid ones), one Rust wheel (xgrammar brings torch and triton), and
JSON Schema, regex and Lark alike. Its mask per token is slower at the median on bounded
schemas (~30 us against ~5 us) but well under 1% of a decode step. A request's grammar is
compiled on the HTTP side (off the device thread) into a `Grammar` per choice; the scheduler
asks it for each step's bitmask and tells it each drawn token (llama2_jax.inference.requests.
Constraint). Nothing here imports JAX.
"""

from __future__ import annotations

import functools
import json
import threading
from typing import Any

import numpy as np

from llama2_jax.inference.requests import mask_words
from llama2_jax.tokenizer import Tokenizer
from llama2_jax.tokenizer_json import fast_tokenizer


class GrammarError(ValueError):
    """A grammar or schema llguidance cannot compile (HTTP 400)."""


class Grammars:
    """Compiles requests' grammars against one tokenizer (its llguidance form built once, on
    first use: about a second)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lock = threading.Lock()

    @functools.cached_property
    def _ll(self):
        import llguidance
        tok = fast_tokenizer(str(self.tokenizer.path))
        return llguidance.LLTokenizer(tok.to_str(), n_vocab=self.vocab_size,
                                      eos_token=self.tokenizer.eos_id)

    def compile(self, kind: str, spec: Any) -> "Grammar":
        """A Grammar of `kind` json_schema (spec: a dict), regex, choice (a list of strings)
        or lark (text); raises GrammarError naming what is wrong."""
        import llguidance
        M = llguidance.LLMatcher
        try:
            if kind == "json_schema":
                if not isinstance(spec, dict):
                    raise GrammarError("the JSON schema must be an object")
                grammar = M.grammar_from_json_schema(json.dumps(spec))
            elif kind == "regex":
                grammar = M.grammar_from_regex(str(spec))
            elif kind == "choice":
                if not (isinstance(spec, list) and spec and all(isinstance(c, str) for c in spec)):
                    raise GrammarError("choices must be a non-empty list of strings")
                grammar = M.grammar_from_lark(
                    "start: " + " | ".join(json.dumps(c) for c in spec))
            elif kind == "lark":
                grammar = M.grammar_from_lark(str(spec))
            else:
                raise GrammarError(f"unknown grammar kind {kind!r}")
        except ValueError as e:
            raise GrammarError(str(e)) from None
        with self._lock:  # the first call builds the tokenizer
            tokenizer = self._ll
        matcher = M(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return Grammar(matcher, mask_words(self.vocab_size))


class Grammar:
    """One choice's grammar state: the allowed tokens of its next step, and the tokens drawn."""

    def __init__(self, matcher, words: int):
        self.matcher, self.words = matcher, words

    def copy(self) -> "Grammar":
        return Grammar(self.matcher.deep_copy(), self.words)

    def fill_mask(self, out: np.ndarray) -> None:
        """Write the next token's bitmask into out [words] int32 (C-contiguous)."""
        self.matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)

    def consume(self, token: int) -> bool:
        """Advance by a drawn token; False if the grammar refuses it."""
        return self.matcher.consume_token(int(token))

    @property
    def complete(self) -> bool:
        """Nothing but the end may follow (the answer is whole)."""
        return self.matcher.is_stopped()
