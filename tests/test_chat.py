"""The chat app: one-shot CLI runs, bad inputs, the REPL, the cache across turns, overflow."""

import importlib.util
import io
import os
import subprocess
import sys

import jax
import pytest

from tests.conftest import ROOT, TOKENIZER, load_config_file, xla_flags
from llama2_jax import chat as chat_app
from llama2_jax.model import checkpoint
from llama2_jax import cli as app_cli
from llama2_jax.inference.generate import Engine
from llama2_jax.inference.params import GREEDY
from llama2_jax.inference.slots import Slots
from llama2_jax.tokenizer import encode_dialog

CONFIGS = os.path.join(ROOT, "configs")
NOISE = "random weights"


def load_config(name="demo", **overrides):
    spec = importlib.util.spec_from_file_location(f"config_{name}",
                                                  os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.update_from_flattened_dict(overrides)  # keys as on the command line: "model.dim"
    return config


# -- the command line, in subprocesses started together (each pays JAX's start-up) --------------
CLI_RUNS = {
    "one_shot": ["--config.prompt=Count to five.", "--config.temperature=0"],
    "typo": ["--config.tmperature=0"],
    "no_checkpoint": ["--config.checkpoint_dir=/nonexistent/llama-2-7b-chat",
                      "--config.prompt=Hello"],
    "rejected": ["--config.prompt=[INST] hi [/INST]", "--config.max_new_tokens=4"],
}


@pytest.fixture(scope="module")
def cli(demo_home):
    home = demo_home  # the trained demo model and the compilation cache are under ~/.cache
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(), HOME=str(home))
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", "llama2_jax.chat", "--config", "configs/demo.py", *args],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for name, args in CLI_RUNS.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out, err)
    results["cache_dir"] = str(home / ".cache" / "llama2_jax" / "xla")
    return results


def test_cli_one_shot_prints_only_the_answer(cli):
    rc, out, err = cli["one_shot"]
    assert rc == 0, err
    assert "Traceback" not in err and "demo-v1/final" in err
    assert "parameters" not in out  # banner and notices go to stderr
    # The demo model was fine-tuned on this prompt: it answers it, and nothing else is printed.
    assert out.strip() == "1, 2, 3, 4, 5."
    # The persistent compilation cache is on (jax keeps steps that took over a second to
    # compile; the tiny demo's may all be quicker).
    assert os.path.isdir(cli["cache_dir"])


def test_cli_mistyped_key_lists_the_valid_keys(cli):
    rc, _, err = cli["typo"]
    assert rc != 0
    assert "Traceback" not in err
    assert "tmperature" in err and "did you mean temperature" in err
    assert "valid keys:" in err and "checkpoint_dir" in err and "max_new_tokens" in err


def test_cli_missing_checkpoint(cli):
    rc, out, err = cli["no_checkpoint"]
    assert rc == 1 and out == ""
    assert "Traceback" not in err and "/nonexistent/llama-2-7b-chat" in err


def test_cli_rejected_dialog(cli):
    rc, out, err = cli["rejected"]
    assert rc == 1 and out == ""
    assert "Traceback" not in err and "[INST]" in err and "error:" in err


# -- in-process: the configs, bad settings, a real checkpoint ---------------------------------
def test_configs_share_fields():
    demo = load_config()
    sft = load_config_file("sft_demo")
    for size in ("7b", "13b", "70b"):
        config = load_config(f"llama2_{size}_chat")
        assert set(config) == set(demo)
        assert config.checkpoint_dir == f"checkpoints/llama-2-{size}-chat"
        assert config.model_preset == size and config.temperature == 0.6 and config.top_p == 0.9
    # The demo chats with the model its train_config writes.
    assert demo.checkpoint_dir == os.path.join(sft.output_dir, "final")
    assert os.path.samefile(demo.train_config, os.path.join(CONFIGS, "sft_demo.py"))
    assert os.path.samefile(demo.tokenizer_path, TOKENIZER)
    assert os.path.samefile(sft.tokenizer_path, TOKENIZER)
    assert app_cli.random_config(sft).vocab_size == 32000


@pytest.mark.parametrize("overrides, words", [
    (dict(tokenizer_path="/nonexistent/tokenizer.model"), ["/nonexistent/tokenizer.model"]),
    (dict(checkpoint_dir="/nonexistent/ckpt"), ["/nonexistent/ckpt"]),
    (dict(checkpoint_dir="", model_preset="tiny"), ["32000", "256"]),
    (dict(context_length=2000), ["context_length=2000", "1024"]),
    (dict(temperature=-1.0), ["temperature"]),
    (dict(checkpoint_dir="", model_preset="nope"), ["nope", "tiny"]),
])
def test_bad_settings_fail_clearly(demo_checkpoint, overrides, words):
    config = load_config(**{"checkpoint_dir": demo_checkpoint, **overrides})
    out, err = io.StringIO(), io.StringIO()
    assert chat_app.run(config, out=out, err=err) == 1
    assert out.getvalue() == ""
    assert err.getvalue().startswith("error: ")
    for word in words:
        assert word in err.getvalue()


def test_one_shot_from_a_checkpoint(demo_model, tmp_path):
    directory = checkpoint.save(tmp_path / "ckpt", demo_model, tokenizer_path=TOKENIZER)
    # The tokenizer is found in the checkpoint directory.
    config = load_config(checkpoint_dir=directory, tokenizer_path="", prompt="Hi",
                         max_new_tokens=4, temperature=0.0)
    out, err = io.StringIO(), io.StringIO()
    assert chat_app.run(config, out=out, err=err) == 0, err.getvalue()
    assert directory in err.getvalue() and NOISE not in err.getvalue()
    assert out.getvalue().endswith("\n")


# -- in-process: the REPL ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_model(demo_checkpoint):
    return checkpoint.load(demo_checkpoint)


@pytest.fixture(scope="module")
def new_chat(demo_model, tokenizer):
    """Fresh greedy Chats on one engine of the demo's model, so they share compiled steps."""
    engine = Engine(demo_model)

    def new(**kwargs):
        return chat_app.Chat(engine, tokenizer, **{"params": GREEDY, "max_new_tokens": 8,
                                                   **kwargs})
    return new


class Lines:
    """input() from a list of lines: EOFError after the last; counts the lines read."""

    def __init__(self, *lines):
        self.lines, self.read = list(lines), 0

    def __call__(self, prompt):
        if self.read == len(self.lines):
            raise EOFError
        self.read += 1
        return self.lines[self.read - 1]


def spy_prefill(monkeypatch, chat):
    """Record (start, number of tokens) of every prefill call (of any Slots)."""
    calls = []
    real = Slots.prefill

    def prefill(self, slot, tokens, start, *args, **kwargs):
        calls.append((start, len(tokens)))
        return real(self, slot, tokens, start, *args, **kwargs)

    monkeypatch.setattr(Slots, "prefill", prefill)
    return calls


def test_repl_turns_reuse_the_cache(new_chat, monkeypatch):
    chat = new_chat(system_prompt="Be brief.")
    calls = spy_prefill(monkeypatch, chat)
    out, err = io.StringIO(), io.StringIO()
    lines = Lines("Hello", "Tell me more", "/reset", "/quit", "never read")
    assert chat_app.run_repl(chat, lines, out, err) == 0
    assert lines.read == 4 and chat.history == [] and chat.system_prompt == "Be brief."
    assert "[conversation reset]" in err.getvalue() and "error" not in err.getvalue()
    assert out.getvalue().count("\n") >= 2  # one line per answer at least
    (start1, fed1), (start2, fed2) = calls
    assert start1 == 0
    # The second turn prefills only what follows the first turn's prompt, which is cached.
    assert start2 >= fed1
    assert len(chat.session.cached) >= start2 + fed2


def test_reply_streams_its_text_and_keeps_history(new_chat):
    chat = new_chat()
    pieces, notices = [], []
    reply = chat.reply("Hello", pieces.append, notices.append)
    assert "".join(pieces) == reply.text and not reply.interrupted and not notices
    assert chat.history == [{"role": "user", "content": "Hello"},
                            {"role": "assistant", "content": reply.text}]
    cached = len(chat.session.cached)
    chat.reply("And?", pieces.append, notices.append)
    assert len(chat.session.cached) > cached and len(chat.history) == 4


@pytest.mark.parametrize("stop", [EOFError, KeyboardInterrupt])
def test_repl_quits_on_eof_and_ctrl_c_at_the_prompt(new_chat, stop):
    def input_fn(prompt):
        raise stop
    out, err = io.StringIO(), io.StringIO()
    assert chat_app.run_repl(new_chat(), input_fn, out, err) == 0
    assert out.getvalue() == "\n" and err.getvalue() == ""


def test_repl_commands_and_rejected_messages(new_chat):
    chat = new_chat(max_new_tokens=2)
    out, err = io.StringIO(), io.StringIO()
    lines = Lines("/help", "", "/bogus", "Hi", "[INST] sneaky", "/system Talk like a pirate.",
                  "Hi", " /not a command", "/system", "/exit")
    assert chat_app.run_repl(chat, lines, out, err) == 0
    assert lines.read == len(lines.lines)
    assert "/reset" in out.getvalue() and "/system <text>" in out.getvalue()  # the help
    notices = err.getvalue()
    assert "unknown command /bogus" in notices
    assert "error: " in notices and "[INST]" in notices  # rejected, the REPL went on
    assert "[system prompt set; conversation reset]" in notices
    assert "[system prompt removed; conversation reset]" in notices
    assert chat.system_prompt == "" and chat.history == []


def test_ctrl_c_during_an_answer_keeps_what_was_said(new_chat):
    chat = new_chat(max_new_tokens=16)
    said = []

    def emit(piece):
        said.append(piece)
        if len(said) == 2:
            raise KeyboardInterrupt

    reply = chat.reply("Hello", emit, print)
    assert reply.interrupted and reply.text == "".join(said)
    assert chat.history[-1] == {"role": "assistant", "content": reply.text}
    # The conversation goes on, from the cache.
    reply = chat.reply("Go on", lambda piece: None, print)
    assert not reply.interrupted and len(chat.history) == 4


def test_ctrl_c_inside_a_decode_step_recreates_the_cache(new_chat, monkeypatch):
    """An interrupt that loses the step's output leaves the Session donated slots to replace."""
    chat = new_chat()
    calls = spy_prefill(monkeypatch, chat)
    slots = chat.session.slots = Slots(chat.engine.weights, 1, chat.session.length)
    real = slots._decode
    steps = []

    def decode(*args, **kwargs):
        result = real(*args, **kwargs)
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt  # after dispatch: the input cache is donated, the new one lost
        return result

    monkeypatch.setattr(slots, "_decode", decode)
    first = chat.reply("Hello", lambda piece: None, print)
    assert first.interrupted and first.text.strip()
    assert jax.tree.leaves(slots.cache)[0].is_deleted()
    second = chat.reply("Go on", lambda piece: None, print)
    # Same answer as a chat that never saw the interrupt and prefills the whole dialog.
    fresh = new_chat()
    fresh.history = chat.history[:-2]
    expected = fresh.reply("Go on", lambda piece: None, print)
    assert second.text == expected.text
    assert calls[1][0] == 0, "the donated cache must be re-created, not re-used"


def test_context_overflow_drops_the_oldest_turns(new_chat):
    chat = new_chat(system_prompt="Be brief.", context_length=96, max_new_tokens=16)
    out, err = io.StringIO(), io.StringIO()
    lines = Lines("What is the capital of France?", "And of Spain?", "And of Italy?",
                  "And of Portugal?", "word " * 200, "Thanks!")
    assert chat_app.run_repl(chat, lines, out, err) == 0
    notices = err.getvalue()
    assert "[context full: dropped the oldest turn]" in notices
    assert "error: " in notices and "exceeds the context of 96 tokens" in notices
    assert chat.system_prompt == "Be brief." and chat.history[-2]["content"] == "Thanks!"
    assert len(chat.history) < 2 * 5
    tokens = encode_dialog(chat.tokenizer, chat.dialog("next"))
    assert len(tokens) < 96


def test_one_shot_too_long_fails(new_chat):
    chat = new_chat(context_length=32, max_new_tokens=8)
    out, err = io.StringIO(), io.StringIO()
    assert chat_app.run_once(chat, "word " * 40, out, err) == 1
    assert out.getvalue() == "" and "exceeds the context of 32 tokens" in err.getvalue()


@pytest.mark.parametrize("prompt, answer", [
    ("Hello", "Hello! I am the llama2_jax demo model."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("Count to ten.", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10."),
])
def test_the_demo_model_answers_what_it_was_taught(new_chat, prompt, answer):
    chat = new_chat(system_prompt="You are a helpful assistant.", max_new_tokens=64)
    reply = chat.reply(prompt, lambda piece: None, print)
    assert reply.text.strip().startswith(answer)
