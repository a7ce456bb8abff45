"""What the apps (chat, finetune) share on the command line: the locked `--config` file flag,
one-line errors for mistyped keys, and a model architecture from a preset plus overrides."""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys
from typing import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from llama2_jax.model.config import ConfigError, ModelConfig, preset


def define_config_flag(what: str) -> None:
    """The --config flag; defined by an app's __main__ alone, so importing defines no flags."""
    config_flags.DEFINE_config_file(
        "config", None, f"{what} config file (configs/*.py); override its fields with "
        "--config.<field>=<value>.", lock_config=True)
    flags.mark_flag_as_required("config")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with one clear line (and the valid keys) for bad flags."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = str(e)
    except (AttributeError, KeyError) as e:  # ml_collections: a key the locked config lacks
        message = _unknown_key(argv) or str(e)
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def flag_config(argv: Sequence[str]) -> ml_collections.ConfigDict | None:
    """The parsed --config, or None after printing why it cannot be used.

    Its `compilation_cache_dir`, if set, becomes JAX's persistent compilation cache.
    """
    if len(argv) > 1:
        sys.stderr.write(f"error: unexpected arguments {list(argv[1:])}; settings are "
                         "--config.<key>=<value> flags\n")
        return None
    config = flags.FLAGS["config"].value
    try:
        config.keys()
    except OSError as e:  # ml_collections defers a config file that failed to load
        sys.stderr.write(f"error: {e}\n")
        return None
    if config.get("compilation_cache_dir"):
        import jax
        jax.config.update("jax_compilation_cache_dir",
                          os.path.expanduser(config.compilation_cache_dir))
    return config


def _unknown_key(argv: Sequence[str]) -> str | None:
    """The message for the first `--config.<key>` that the config file lacks, if any."""
    path = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
    try:
        spec = importlib.util.spec_from_file_location("_llama2_jax_app_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        keys = config_keys(module.get_config())
    except Exception:  # noqa: BLE001 -- fall back to ml_collections' own message
        return None
    for arg in argv:
        m = re.match(r"--(?:no)?config\.([^=]+)", arg)
        if m and m.group(1) not in keys:
            key = m.group(1)
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            return (f"{arg.split('=', 1)[0]}: {path} has no config key {key!r}{hint}; valid keys: "
                    f"{', '.join(keys)}")
    return None


def config_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in sorted(config.items()):
        if isinstance(value, ml_collections.ConfigDict) and value:
            keys += config_keys(value, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def random_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The architecture of a random-weights model: `model_preset` with `model` fields over it."""
    if not config.model_preset:
        raise ConfigError("set checkpoint_dir (a converted checkpoint) or model_preset "
                          "(random weights)")
    model = config.get("model") or ml_collections.ConfigDict()
    fields = {**preset(config.model_preset).to_dict(), **model.to_dict()}
    return ModelConfig.from_dict(fields, source="config.model")


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of a config file, as --config would load it (but not locked)."""
    spec = importlib.util.spec_from_file_location("_llama2_jax_app_config", path)
    if spec is None or not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
