"""One conversation with a chat model: Meta's chat format over a Session whose KV cache lives
across turns, the oldest turns dropped when the context is full, answers streamed as text.
Used by the terminal chat (llama2_jax.chat) and the notebook; the server keeps no
conversations (clients resend them, and its prefix cache finds the earlier turns).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from llama2_jax import settings as app_build
from llama2_jax.settings import SettingsError
from llama2_jax.model.config import ModelConfig
from llama2_jax.inference.generate import ContextError, Engine, Session
from llama2_jax.inference.params import SamplingParams
from llama2_jax.tokenizer import SPECIAL_TAGS, StreamDecoder, Tokenizer, encode_dialog

Message = dict[str, str]


@dataclasses.dataclass
class Reply:
    text: str
    interrupted: bool  # stopped by Ctrl-C


def context_size(model_cfg: ModelConfig, requested: int, max_new_tokens: int) -> int:
    """The context a chat runs in (`requested`, 0 = the model's), checked against the room
    for an answer (`max_new_tokens`) that it must leave."""
    length = app_build.context_length(model_cfg, requested)
    if not 0 < max_new_tokens < length:
        raise SettingsError(f"max_new_tokens={max_new_tokens} must be in 1..{length - 1}: it is "
                            f"the room kept for an answer in the context of {length} tokens")
    return length


class Chat:
    """One conversation: system prompt, user/assistant history and a KV cache across turns.

    Turn t draws with params.seed + t (so a one-shot answer is `generate` with params).
    """

    def __init__(self, engine: Engine, tokenizer: Tokenizer, *, params: SamplingParams,
                 max_new_tokens: int, context_length: int = 0, system_prompt: str = ""):
        app_build.check_vocab(tokenizer, engine.config)
        self.engine = engine
        self.tokenizer = tokenizer
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.context_length = context_size(engine.config, context_length, max_new_tokens)
        self.system_prompt = system_prompt
        self.session = Session(engine, self.context_length)
        self.history: list[Message] = []  # user, assistant, user, assistant, ...
        self.turns = 0

    def reset(self, system_prompt: str | None = None) -> None:
        """Forget the conversation; with `system_prompt`, replace the system prompt too.

        The KV cache is kept: the next turn re-uses whatever prefix it shares.
        """
        if system_prompt is not None:
            self.system_prompt = system_prompt
        self.history = []

    def dialog(self, user_text: str, history: Sequence[Message] | None = None) -> list[Message]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        history = self.history if history is None else history
        return system + list(history) + [{"role": "user", "content": user_text}]

    def fit(self, user_text: str) -> tuple[list[Message], list[int]]:
        """The history that fits with `user_text` and an answer, and the dialog's token ids.

        Drops the oldest user/assistant pairs until the tokens plus `max_new_tokens` fit the
        context. Raises DialogError for a message the chat format rejects, ContextError when
        the message does not fit even alone.
        """
        history = self.history
        while True:
            tokens = encode_dialog(self.tokenizer, self.dialog(user_text, history))
            if len(tokens) + self.max_new_tokens <= self.context_length:
                return history, tokens
            if not history:
                what = "the system prompt and message" if self.system_prompt else "the message"
                raise ContextError(
                    f"{what} take {len(tokens)} tokens; with room for max_new_tokens="
                    f"{self.max_new_tokens} to answer that exceeds the context of "
                    f"{self.context_length} tokens: shorten it, or raise context_length or "
                    "lower max_new_tokens")
            history = history[2:]

    def reply(self, user_text: str, emit: Callable[[str], None],
              notice: Callable[[str], None]) -> Reply:
        """Answer `user_text`, streaming the text to `emit` as it is generated.

        `notice` receives remarks about the conversation (dropped turns). Ctrl-C stops the
        answer (Reply.interrupted); a stopped answer that said nothing drops the turn.
        Raises what `fit` raises, leaving the conversation unchanged.
        """
        history, tokens = self.fit(user_text)
        dropped = (len(self.history) - len(history)) // 2
        if dropped:
            turns = "the oldest turn" if dropped == 1 else f"the {dropped} oldest turns"
            notice(f"[context full: dropped {turns}]")
        self.history = list(history)
        decoder = StreamDecoder(self.tokenizer)
        params = dataclasses.replace(self.params, seed=self.params.seed + self.turns)
        steps = self.session.generate(tokens, max_new_tokens=self.max_new_tokens,
                                      params=params, stop_ids=[self.tokenizer.eos_id])
        self.turns += 1
        interrupted = False
        try:
            for token in steps:
                piece = decoder.push([token])
                if piece:
                    emit(piece)
            emit(decoder.flush())
        except KeyboardInterrupt:
            # Session keeps its cache consistent (a donated cache is re-created next turn).
            interrupted = True
        finally:
            steps.close()
        text = self.tokenizer.decode(decoder.ids)
        if interrupted and not text.strip():
            return Reply(text, interrupted)
        tags = [t for t in SPECIAL_TAGS if t in text]
        if tags:
            # The chat format refuses them in any message: kept, they would reject every turn.
            for tag in tags:
                text = text.replace(tag, "")
            notice(f"[the answer's reserved tag(s) {', '.join(tags)} were left out of the "
                   "conversation]")
        self.history += [{"role": "user", "content": user_text},
                         {"role": "assistant", "content": text}]
        return Reply(text, interrupted)
