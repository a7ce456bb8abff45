"""The demo's model: trained on first use, before an app loads it.

A chat or serve config whose `train_config` names a fine-tuning config (configs/sft_demo.py),
and whose `checkpoint_dir` is that run's `<output_dir>/final`, chats with a model that
fine-tuning makes: `ensure_trained` runs the fine-tuning app once, before the app's settings
are checked, so nothing needs downloading and the demo answers sensibly on a CPU.
"""

from __future__ import annotations

import fcntl
import os
from typing import TextIO

import ml_collections

from llama2_jax import cli, finetune
from llama2_jax.settings import USER_ERRORS, SettingsError


def ensure_trained(config: ml_collections.ConfigDict, err: TextIO) -> None:
    """Train `config.checkpoint_dir` with `config.train_config` if that is how it is made and
    it does not exist yet; otherwise nothing."""
    train_config = config.get("train_config", "")
    checkpoint_dir = os.path.expanduser(config.checkpoint_dir)
    if checkpoint_dir and train_config and not os.path.isdir(checkpoint_dir):
        train_first(train_config, checkpoint_dir, err)


def train_first(train_config: str, checkpoint_dir: str, err: TextIO) -> None:
    """Fine-tune `checkpoint_dir` with the SFT config file `train_config`, once.

    Several apps started at once wait for one training run (a lock beside the run's
    directory); an interrupted training resumes at the next start.
    """
    sft = cli.load_config_file(train_config)
    final = os.path.join(os.path.expanduser(sft.output_dir), finetune.FINAL_DIR)
    if os.path.abspath(final) != os.path.abspath(checkpoint_dir):
        return  # another checkpoint was asked for: it must exist (reported by the caller)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    with open(os.path.dirname(final) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(final):
            return  # trained by an app that held the lock before us
        err.write(f"{checkpoint_dir} does not exist yet: training it with {train_config} "
                  f"(once; about 1.5 minutes on a 2-core CPU) ...\n")
        err.flush()
        try:
            finetune.train(sft, err)
        except USER_ERRORS as e:
            raise SettingsError(f"training {checkpoint_dir} with {train_config} failed: "
                                f"{e}") from None
