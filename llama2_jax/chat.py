"""Chat with Llama 2 in a terminal: `python -m llama2_jax.chat --config configs/<name>.py`.

  python -m llama2_jax.chat --config configs/demo.py            # CPU, nothing to download
  python -m llama2_jax.chat --config configs/llama2_7b_chat.py \\
      --config.checkpoint_dir=/data/llama-2-7b-chat --config.temperature=0
  python -m llama2_jax.chat --config configs/llama2_7b_chat.py --config.prompt="Hi"  # one-shot

Any field of the config file can be overridden with `--config.<field>=<value>`; the fields are
described in configs/llama2_7b_chat.py. A checkpoint is a directory written by
convert/meta_to_orbax.py or convert/hf_to_orbax.py; with `checkpoint_dir` empty the model has
random weights (`model_preset` plus the `model` fields), for trying the app out.

With `prompt` set, the answer is printed and the app exits: stdout holds the answer alone (the
banner and notices go to stderr), so it can be scripted. Without it the chat is interactive:
the conversation's KV cache lives across turns, so a turn prefills only its new tokens. When
the dialog and room for an answer (`max_new_tokens`) outgrow the context, the oldest
user/assistant turns are dropped; the system prompt stays. Type /help for the commands.

Multi-host (`--config.multihost=true`, one process per host): process 0 reads the input and
prints. Ctrl-C reaches process 0 alone, so it cannot stop an answer there: end the run instead.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence, TextIO

import jax
import ml_collections
import numpy as np
from absl import app, logging

from llama2_jax import demo
from llama2_jax import settings as app_build
from llama2_jax import cli, distributed
from llama2_jax.model import sharding
from llama2_jax.settings import USER_ERRORS, SettingsError
from llama2_jax.inference.generate import ContextError, Engine
from llama2_jax.inference.params import sampling_params
from llama2_jax.conversation import Chat, Message, Reply, context_size  # noqa: F401
from llama2_jax.tokenizer import DialogError

PROMPT = ">>> "
HELP = """\
/reset          forget the conversation (the system prompt stays)
/system <text>  set the system prompt and start over (/system alone removes it)
/help           this list
/quit, /exit    leave (so do Ctrl-D, and Ctrl-C at the prompt)
Ctrl-C during an answer stops it; what was said so far stays in the conversation.
A message that starts with '/' is sent as a message if you begin it with a space."""
# A chat setting that cannot work (the same error as the other apps' settings).
ChatError = SettingsError

def base_config() -> ml_collections.ConfigDict:
    """Every chat setting with its default; configs/*.py start from this and change a few."""
    c = app_build.inference_fields(ml_collections.ConfigDict())
    c.system_prompt = ""
    c.temperature = 0.6  # Meta's chat defaults; 0 = greedy
    c.top_p = 0.9
    c.top_k = 0  # 0 = off
    c.max_new_tokens = 512
    c.prompt = ""  # "" = interactive; else answer this one message and exit
    return c


def run_once(chat: Chat, prompt: str, out: TextIO, err: TextIO) -> int:
    """Answer `prompt` on `out`; returns the exit status (1 for a rejected prompt)."""
    try:
        reply = chat.reply(prompt, _writer(out), _writer(err, "\n"))
    except (DialogError, ContextError) as e:
        err.write(f"error: {e}\n")
        return 1
    out.write("\n")
    out.flush()
    return 130 if reply.interrupted else 0


def run_repl(chat: Chat, input_fn: Callable[[str], str], out: TextIO, err: TextIO) -> int:
    """Chat until /quit, end of input or Ctrl-C at the prompt; returns the exit status (0)."""
    emit, notice = _writer(out), _writer(err, "\n")
    while True:
        line = _read_line(input_fn)
        if line is None:  # EOF or Ctrl-C at the prompt
            out.write("\n")
            break
        if line.startswith("/"):
            command, _, arg = line.strip().partition(" ")
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                chat.reset()
                notice("[conversation reset]")
            elif command == "/system":
                chat.reset(system_prompt=arg.strip())
                notice(f"[system prompt {'set' if arg.strip() else 'removed'}; "
                       "conversation reset]")
            elif command == "/help":
                out.write(HELP + "\n")
            else:
                notice(f"unknown command {command}; /help lists the commands")
            continue
        if not line.strip():
            continue
        try:
            reply = chat.reply(line, emit, notice)
        except (DialogError, ContextError) as e:
            notice(f"error: {e}")
            continue
        except KeyboardInterrupt:  # before the answer began: the turn did not happen
            out.write("\n")
            continue
        out.write("\n")
        if reply.interrupted:
            notice("[stopped]")
    out.flush()
    return 0


def _writer(stream: TextIO, end: str = "") -> Callable[[str], None]:
    def write(text: str) -> None:
        stream.write(text + end)
        stream.flush()
    return write


def _read_line(input_fn: Callable[[str], str]) -> str | None:
    """Process 0's next input line, on every process (None: end of input)."""
    line = None
    if sharding.is_main_process():
        try:
            line = input_fn(PROMPT)
        except (EOFError, KeyboardInterrupt):
            line = None
    if jax.process_count() == 1:
        return line
    from jax.experimental import multihost_utils
    data = np.frombuffer((line or "").encode(), np.uint8)
    n = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if line is None else data.size)))
    if n < 0:
        return None
    buf = np.zeros(max(n, 1), np.uint8)
    buf[:data.size] = data[:n]
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))[:n]).decode()


def build(config: ml_collections.ConfigDict, err: TextIO) -> Chat:
    """The Chat `config` describes, its settings checked before any weights are loaded.

    Prints what is loaded and a banner to `err`. Raises one of USER_ERRORS for bad settings.
    """
    demo.ensure_trained(config, err)
    prepared = app_build.prepare(config, err, "chat")
    length = context_size(prepared.model_config, config.context_length, config.max_new_tokens)
    try:
        params = sampling_params(config.temperature, config.top_p, config.top_k, config.seed)
    except ValueError as e:
        raise ChatError(str(e)) from None
    model = prepared.load(err)
    source = prepared.checkpoint_dir or f"random weights, model_preset={config.model_preset!r}"
    err.write(app_build.banner("chat", model, source, prepared.mesh, length))
    if not prepared.checkpoint_dir:
        err.write("NOTE: no checkpoint_dir, so the model has random weights; its answers are "
                  "noise.\n")
    err.flush()
    engine = Engine(model, prepared.mesh, kv_quantization=app_build.kv_method(config))
    return Chat(engine, prepared.tokenizer, params=params,
                max_new_tokens=config.max_new_tokens, context_length=length,
                system_prompt=config.system_prompt)


# -- command line ----------------------------------------------------------------------------
def run(config: ml_collections.ConfigDict, input_fn: Callable[[str], str] = input,
        out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The app for a loaded config: one-shot or interactive. Returns the exit status.

    `out`/`err` default to stdout/stderr on process 0 and to nothing on the others.
    """
    try:
        distributed.initialize(config)
        if not sharding.is_main_process():
            out = err = open(os.devnull, "w")
        out = sys.stdout if out is None else out
        err = sys.stderr if err is None else err
        try:
            chat = build(config, err)
        except USER_ERRORS as e:
            err.write(f"error: {e}\n")
            return 1
        if config.prompt:
            return run_once(chat, config.prompt, out, err)
        err.write("Type a message, /help for the commands; Ctrl-D quits.\n")
        return run_repl(chat, input_fn, out, err)
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str]) -> int:
    logging.set_verbosity(logging.WARNING)  # keep JAX's backend probing off the chat screen
    config = cli.flag_config(argv)
    if config is None:
        return 2
    sys.stdout.reconfigure(errors="replace")  # a model may say anything: never die printing it
    if sys.stdin.isatty():
        import readline  # noqa: F401 -- line editing and history for input()
    return run(config)


if __name__ == "__main__":
    cli.define_config_flag("Chat")
    app.run(main, flags_parser=cli.parse_flags)
