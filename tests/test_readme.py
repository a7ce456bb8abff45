"""The README says what the code does: every command's config file and `--config.<field>`
exists, every field of the chat settings table is a chat setting, the planner's flags parse,
and the Python API example runs."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from llama2_jax import cli
from tests.conftest import ROOT, TOKENIZER, xla_flags

README = os.path.join(ROOT, "README.md")


def readme() -> str:
    with open(README) as f:
        return f.read()


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", readme(), re.S)


def commands() -> list[list[str]]:
    """Every `python ...` command of the README's bash blocks, continuation lines joined."""
    out = []
    for block in code_blocks("bash"):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" #")[0].strip()
            for part in re.split(r"&&|\|", line):
                part = part.strip()
                if part.startswith("python "):
                    try:
                        out.append(shlex.split(part))
                    except ValueError:  # the end of a command quoted for ssh: "... 'x'"
                        out.append(shlex.split(part.rstrip('"')))
    return out


def config_keys(path: str) -> set[str]:
    return set(cli.config_keys(cli.load_config_file(os.path.join(ROOT, path))))


def test_every_app_command_names_a_config_and_fields_it_has():
    apps = [w for w in commands() if len(w) > 2 and w[1] == "-m"
            and w[2] in ("llama2_jax.chat", "llama2_jax.serve", "llama2_jax.finetune")]
    assert len(apps) >= 8, apps
    for words in apps:
        config = words[words.index("--config") + 1]
        assert os.path.isfile(os.path.join(ROOT, config)), f"{config} in {words}"
        keys = config_keys(config)
        for w in words:
            if w.startswith("--config."):
                field = w[len("--config."):].split("=")[0]
                assert field in keys, f"README: {' '.join(words)}: no field {field!r}"


def test_every_script_and_module_the_readme_runs_exists():
    for words in commands():
        if words[1] == "-m":
            module = words[2]
            if module in ("pytest", "pip"):
                continue
            path = os.path.join(ROOT, *module.split("."))
            assert os.path.isfile(path + ".py") or os.path.isdir(path), words
        else:
            assert os.path.isfile(os.path.join(ROOT, words[1])), words


def test_the_chat_settings_table_lists_chat_settings():
    text = readme()
    table = text[text.index("| field | meaning |"):]
    table = table[:table.index("\n\n")]
    keys = config_keys("configs/demo.py")
    fields = []
    for row in table.splitlines()[2:]:
        first = row.split("|")[1]
        fields += re.findall(r"`([^`]+)`", first)
    assert len(fields) >= 12
    for field in fields:
        assert field in keys, f"README's chat table: {field!r} is not a chat setting"


def test_the_planners_documented_flags_parse(demo_checkpoint):
    from llama2_jax import plan
    for words in commands():
        if words[1:3] == ["-m", "llama2_jax.plan"]:
            # a checkpoint the README names is one the user has: the demo's stands in
            args = [f"--checkpoint_dir={demo_checkpoint}" if w.startswith("--checkpoint_dir=")
                    else w for w in words[3:]]
            if "--json" not in args:
                args.append("--json")
            # every flag parses; the exit status says whether the plan fits (0 or 1, not 2)
            assert plan.main(args) in (0, 1), words


@pytest.mark.parametrize("block", [b for b in code_blocks("python") if "TINY" in b])
def test_the_runnable_python_example_runs(block):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
    out = subprocess.run([sys.executable, "-c", block], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert os.path.exists(TOKENIZER)
