"""Supervised fine-tuning data: JSONL dialogs -> token ids with a loss mask -> packed batches.

A line of a data file is one example, either
  {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
    (an optional system message, then user/assistant turns alternating, ending with the
    assistant's), or
  {"prompt": ..., "completion": ...}   (optionally "system"): one user turn and its answer.
It is tokenized exactly as the chat app sends a dialog to the model (Meta's chat format, see
tokenizer.encode_dialog); the loss is on the assistant's tokens and their EOS only.

Examples become rows of `seq_len` tokens: packed several to a row (`packing=True`; each keeps
its own positions and attends only within itself, through segment ids) or one to a row, padded.
`Batches` deals rows in a seeded order that is a function of (seed, epoch) alone, so a run
resumed from its saved `position` sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator, Mapping, Sequence

import numpy as np

from llama2_jax.tokenizer import DialogError, Tokenizer, chat_turns, check_dialog

TRUNCATE, DROP = "truncate", "drop"


class DataError(ValueError):
    """A data file or example that cannot be used; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized dialog: ids [n] and, per id, whether the model is trained to predict it."""

    tokens: np.ndarray  # [n] int32
    loss: np.ndarray  # [n] bool: the assistant's tokens and their EOS
    source: str = ""  # file:line

    def __len__(self) -> int:
        return len(self.tokens)


@dataclasses.dataclass
class Stats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # over-long with max_length_policy="drop", or with no answer token left

    def __str__(self) -> str:
        return (f"{self.examples} examples ({self.truncated} truncated, {self.dropped} dropped "
                "as too long)")


# -- dialogs -> tokens ------------------------------------------------------------------------
def parse_record(record, where: str) -> list[dict]:
    """The messages of one JSONL record (either format), checked; DataError names `where`."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise DataError(f"{where}: 'messages' must be a list of "
                            "{\"role\": ..., \"content\": ...} objects")
    elif "prompt" in record or "completion" in record:
        missing = [k for k in ("prompt", "completion") if k not in record]
        if missing:
            raise DataError(f"{where}: a prompt/completion record lacks {missing[0]!r}")
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]}]
        if "system" in record:
            messages.insert(0, {"role": "system", "content": record["system"]})
    else:
        raise DataError(f"{where}: expected a 'messages' list or 'prompt' and 'completion', got "
                        f"keys {sorted(record)}")
    check_messages(messages, where)
    return messages


def check_messages(messages: Sequence, where: str) -> None:
    """The chat format's checks (tokenizer.check_dialog) for a dialog that ends with an answer."""
    try:
        check_dialog(messages, last="assistant")
    except DialogError as e:
        raise DataError(f"{where}: {e}") from None


def encode_for_training(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]
                        ) -> tuple[list[int], list[bool]]:
    """Ids of a dialog that ends with an answer, in Meta's chat format, and the loss mask.

    The ids are those `encode_dialog` gives for the same turns followed by a user message (so
    training sees what the chat app sends); the mask is True on each answer's tokens and EOS.
    """
    tokens: list[int] = []
    loss: list[bool] = []
    for question, answer in chat_turns(messages):
        turn = tokenizer.encode(f"{question} {answer} ", bos=True, eos=True)
        head = tokenizer.encode(question, bos=True)
        # SentencePiece could merge across the boundary; the answer starts where they part.
        n = next((i for i, (a, b) in enumerate(zip(head, turn)) if a != b), len(head))
        tokens += turn
        loss += [False] * n + [True] * (len(turn) - n)
    return tokens, loss


def read_jsonl(path: str | os.PathLike, tokenizer: Tokenizer, *, max_length: int,
               policy: str = TRUNCATE, stats: Stats | None = None) -> list[Example]:
    """Tokenized examples of a JSONL file; DataError names file:line for a bad line.

    Args:
      max_length: ids per example at most (the row length + 1: inputs and targets are the ids
        shifted by one). Longer examples are cut to it (`policy="truncate"`) or left out
        (`"drop"`); an example left without an answer token is dropped. Both are counted in
        `stats`.
    """
    if policy not in (TRUNCATE, DROP):
        raise DataError(f"max_length_policy={policy!r}: expected {TRUNCATE!r} or {DROP!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    stats = stats if stats is not None else Stats()
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            tokens, loss = encode_for_training(tokenizer, parse_record(record, where))
            if len(tokens) > max_length:
                if policy == DROP:
                    stats.dropped += 1
                    continue
                tokens, loss = tokens[:max_length], loss[:max_length]
                stats.truncated += 1
            if not any(loss[1:]):
                stats.dropped += 1
                continue
            examples.append(Example(np.asarray(tokens, np.int32), np.asarray(loss, bool), where))
    stats.examples += len(examples)
    return examples


def split(examples: Sequence[Example], fraction: float, seed: int
          ) -> tuple[list[Example], list[Example]]:
    """(train, eval): a seeded `fraction` of the examples held out for evaluation."""
    if not 0 <= fraction < 1:
        raise DataError(f"eval_fraction={fraction}: expected a number in [0, 1)")
    n_eval = int(round(len(examples) * fraction))
    if fraction > 0 and n_eval == 0 and len(examples) > 1:
        n_eval = 1
    order = np.random.default_rng([seed, 0xE7A1]).permutation(len(examples))
    held = set(order[:n_eval].tolist())
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


# -- examples -> rows -------------------------------------------------------------------------
def pack(examples: Sequence[Example], seq_len: int, packing: bool = True) -> dict[str, np.ndarray]:
    """Rows of `seq_len` inputs built from the examples, in order.

    Returns arrays [R, seq_len]: `inputs` and `targets` (ids; targets are the inputs shifted by
    one within an example), `weights` (1.0 where a target is an answer token), `segments`
    (1, 2, ... per example in a row, 0 for padding) and `positions` (restarting at 0 for each
    example). With `packing`, consecutive examples share a row while they fit; without, each
    has its own. An example must have at most seq_len + 1 ids.
    """
    rows: list[list[Example]] = []
    used = seq_len  # forces a new row for the first example
    for ex in examples:
        n = len(ex) - 1
        if n > seq_len:
            raise DataError(f"{ex.source}: {len(ex)} ids do not fit a row of {seq_len} (+1)")
        if packing and used + n <= seq_len:
            rows[-1].append(ex)
            used += n
        else:
            rows.append([ex])
            used = n
    out = {k: np.zeros((len(rows), seq_len), np.int32)
           for k in ("inputs", "targets", "segments", "positions")}
    out["weights"] = np.zeros((len(rows), seq_len), np.float32)
    for r, row in enumerate(rows):
        at = 0
        for s, ex in enumerate(row, 1):
            n = len(ex) - 1
            cols = slice(at, at + n)
            out["inputs"][r, cols] = ex.tokens[:-1]
            out["targets"][r, cols] = ex.tokens[1:]
            out["weights"][r, cols] = ex.loss[1:]
            out["segments"][r, cols] = s
            out["positions"][r, cols] = np.arange(n)
            at += n
    return out


class Batches:
    """An endless, seeded stream of training batches [batch_size, seq_len] over the examples.

    Epoch e shuffles the examples with (seed, e), packs them, and deals the rows in order; a
    batch may span two epochs. `position` (epoch, row) is all the state there is.
    """

    def __init__(self, examples: Sequence[Example], *, batch_size: int, seq_len: int,
                 packing: bool, seed: int):
        if not examples:
            raise DataError("no training examples")
        self.examples = list(examples)
        self.batch_size, self.seq_len, self.packing, self.seed = batch_size, seq_len, packing, seed
        self.epoch, self.row = 0, 0
        self._rows: dict[str, np.ndarray] | None = None

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "row": self.row}

    def seek(self, position: Mapping[str, int]) -> None:
        self.epoch, self.row = int(position["epoch"]), int(position["row"])
        self._rows = None

    def _epoch_rows(self) -> dict[str, np.ndarray]:
        if self._rows is None:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))
            self._rows = pack([self.examples[i] for i in order], self.seq_len, self.packing)
        return self._rows

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = []
        need = self.batch_size
        while need:
            rows = self._epoch_rows()
            take = min(need, len(rows["inputs"]) - self.row)
            parts.append({k: v[self.row:self.row + take] for k, v in rows.items()})
            self.row += take
            need -= take
            if self.row == len(rows["inputs"]):
                self.epoch, self.row, self._rows = self.epoch + 1, 0, None
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def eval_batches(examples: Sequence[Example], *, batch_size: int, seq_len: int,
                 packing: bool) -> list[dict[str, np.ndarray]]:
    """The eval examples once, in file order, as full batches (the last padded with empty rows)."""
    rows = pack(examples, seq_len, packing)
    n = len(rows["inputs"])
    pad = -n % batch_size
    rows = {k: np.concatenate([v, np.zeros((pad, seq_len), v.dtype)]) for k, v in rows.items()}
    return [{k: v[i:i + batch_size] for k, v in rows.items()}
            for i in range(0, n + pad, batch_size)]


def segment_mask(segments: np.ndarray):
    """[B, T, T] bool: query t may see key s of the same example (not padding)."""
    return (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
