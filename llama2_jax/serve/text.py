"""Token ids to the text a client sees: whole characters, and nothing from a stop string on."""

from __future__ import annotations

import re
from typing import Sequence

from llama2_jax.tokenizer import StreamDecoder, Tokenizer

_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TextStream:
    """Text of an answer as its tokens arrive, for streaming and for stop strings.

    `push` returns the text that is safe to show: complete UTF-8 characters (StreamDecoder),
    and never the start of what could still become a stop string. When a stop string appears,
    the text ends just before it and `stopped` is set; later tokens are ignored.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()):
        self.decoder = StreamDecoder(tokenizer)
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.text += self.decoder.push([token])
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text, once no more tokens come."""
        if self.stopped:
            return ""
        self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stops:
            start = max(0, self.sent - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = final = True
        end = len(self.text)
        if not final:
            # Hold back the longest tail that a stop string begins with.
            for k in range(min(self.hold, end - self.sent), 0, -1):
                if any(s.startswith(self.text[end - k:]) for s in self.stops):
                    end -= k
                    break
        piece = self.text[self.sent:end]
        self.sent = end
        return piece


def token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    """The bytes a token stands for: its piece with SentencePiece's '▁' as a space, or the
    byte of a byte-fallback token (`<0xE2>`)."""
    piece = tokenizer.sp.id_to_piece(int(token))
    m = _BYTE.match(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def token_text(tokenizer: Tokenizer, token: int) -> tuple[str, list[int]]:
    """(text, bytes) of one token, as OpenAI's logprobs report it (a lone byte of a
    multi-byte character shows as U+FFFD; its bytes say which)."""
    raw = token_bytes(tokenizer, token)
    return raw.decode("utf-8", errors="replace"), list(raw)


def logprob_texts(tokenizer: Tokenizer, ids: Sequence[int],
                  at_start: bool) -> list[tuple[str, list[int]]]:
    """(text, bytes) of each token of `ids` as a client joins them into the decoded text:
    control tokens (BOS, EOS) are empty, and with `at_start` (the ids begin a text, as an
    answer or a prompt does) the first token loses the leading space that SentencePiece's
    decode drops. So the texts of an answer's tokens concatenate to its content, as OpenAI's
    logprobs do."""
    out = []
    for t in ids:
        if tokenizer.sp.is_control(int(t)):
            out.append(("", []))
            continue
        text, raw = token_text(tokenizer, t)
        if at_start and raw[:1] == [0x20] and \
                tokenizer.sp.id_to_piece(int(t)).startswith("\u2581"):
            text, raw = text[1:], raw[1:]
        at_start = False
        out.append((text, raw))
    return out
