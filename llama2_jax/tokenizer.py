"""SentencePiece tokenizer and Meta's Llama 2 chat format (`llama/generation.py`
chat_completion)."""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence

import sentencepiece as spm

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
ROLES = ("system", "user", "assistant")

Message = Mapping[str, str]


class DialogError(ValueError):
    """A dialog Meta's chat format rejects."""


class Tokenizer:
    """Meta's Llama 2 tokenizer: BOS/EOS are added as ids, never parsed from text."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with little context
            raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


def check_dialog(dialog: Sequence[Message], last: str = "user") -> None:
    """Raise DialogError for the dialogs Meta's chat_completion refuses.

    `last` is the role the dialog must end with: "user" for a prompt, "assistant" for a
    training example.
    """
    if not dialog:
        raise DialogError("empty dialog: it needs at least one user message")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise DialogError(f"message {i} must be a mapping with 'role' and 'content': {msg!r}")
        if not isinstance(msg["content"], str):
            raise DialogError(f"message {i}: content must be a string, got "
                              f"{type(msg['content']).__name__}")
        tags = [t for t in SPECIAL_TAGS if t in msg["content"]]
        if tags:
            raise DialogError(f"message {i} ({msg['role']}) contains the reserved tag(s) "
                              f"{', '.join(tags)}, which the chat format does not allow")
    roles = [m["role"] for m in dialog]
    order = ("roles must be an optional 'system' followed by alternating 'user', 'assistant', "
             f"'user', ...; got {roles}")
    for i, role in enumerate(roles):
        if role not in ROLES:
            raise DialogError(f"message {i} has unknown role {role!r} (roles are "
                              f"{', '.join(ROLES)}); {order}")
    body = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(body))]
    if body != expected:
        raise DialogError(order)
    if not body or body[-1] != last:
        raise DialogError(f"the last message must be the {last}'s, got {roles[-1]!r}")


def chat_turns(dialog: Sequence[Message]) -> list[tuple[str, str | None]]:
    """Meta's chat format, the one implementation: each turn's question text
    ("[INST] ... [/INST]", the system prompt inside the first) and its answer's text (None
    for a last user message still to be answered). A turn with an answer is encoded as
    BOS + question + " " + answer + " " + EOS; the open one as BOS + question."""
    dialog = list(dialog)
    if dialog and dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"],
                   "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
                  ] + dialog[2:]
    turns: list[tuple[str, str | None]] = []
    for i in range(0, len(dialog), 2):
        question = f"{B_INST} {dialog[i]['content'].strip()} {E_INST}"
        answer = dialog[i + 1]["content"].strip() if i + 1 < len(dialog) else None
        turns.append((question, answer))
    return turns


def encode_dialog(tokenizer: Tokenizer, dialog: Sequence[Message]) -> list[int]:
    """Token ids of `dialog` in Meta's chat format, ready for the assistant's next answer."""
    check_dialog(dialog)
    tokens: list[int] = []
    for question, answer in chat_turns(dialog):
        if answer is None:
            tokens += tokenizer.encode(question, bos=True, eos=False)
        else:
            tokens += tokenizer.encode(f"{question} {answer} ", bos=True, eos=True)
    return tokens


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a character.

    SentencePiece drops a leading space and byte-fallback tokens form multi-byte characters,
    so the text of the whole answer is decoded and only its new, complete suffix is emitted.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, ids: Iterable[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self.ids)
        end = len(text)
        while end > self.emitted and text[end - 1] == "\ufffd":
            end -= 1  # an incomplete UTF-8 sequence: wait for its remaining bytes
        piece = text[self.emitted:end]
        self.emitted = end
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece = text[self.emitted:]
        self.emitted = len(text)
        return piece
