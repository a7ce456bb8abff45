"""Supervised fine-tuning: `python -m llama2_jax.finetune --config configs/<name>.py`.

  python -m llama2_jax.finetune --config configs/sft_tiny.py          # CPU, under a minute
  python -m llama2_jax.finetune --config configs/sft_7b_lora.py \\
      --config.checkpoint_dir=/data/llama-2-7b-chat --config.train_data=my_dialogs.jsonl

Trains on JSONL dialogs (see llama2_jax/data.py for the two line formats) with the loss on the
assistant's tokens. The whole model (`lora.rank=0`) or low-rank adapters on chosen projections
(the base frozen) are trained with AdamW, warmup + cosine decay, global-norm clipping and
gradient accumulation, sharded over a (data, fsdp, tensor) mesh.

Everything a run writes is under `output_dir`:
  run.json         the settings; a rerun with different ones is refused
  checkpoints/     orbax CheckpointManager: trained params (or adapters), optimizer state,
                   step, data position; every `save_every` steps and on SIGTERM
  metrics.jsonl    loss, eval_loss, learning rate, grad norm, tokens/s per logged step
  events/          the same as TensorBoard scalars (`tensorboard --logdir <output_dir>/events`)
  final/           the fine-tuned model (adapters merged) as a llama2_jax checkpoint, which
                   `llama2_jax.load` and the chat app read directly
  final_adapter/   LoRA runs: the adapters alone with their rank, alpha, targets and base
                   (llama2_jax.model.adapter; convert.adapter_to_peft exports them to PEFT)
Running the same command again resumes from the newest checkpoint, with the weights an
uninterrupted run would have had. `checkpoint_dir` is only read.
"""

from __future__ import annotations

import sys
from typing import Sequence, TextIO

import ml_collections
from absl import app, logging

from llama2_jax import cli, distributed, settings
from llama2_jax.settings import USER_ERRORS
from llama2_jax.training import data
# The run's names, re-exported for the app's users (tests, benchmarks, notebooks).
from llama2_jax.training.trainer import (ADAPTER_DIR, CHECKPOINTS_DIR, EVENTS_DIR,  # noqa: F401
                                         FINAL_DIR, METRICS_FILE, RUN_FILE, FinetuneError,
                                         NonFiniteLoss, Trainer, check_settings)


def base_config() -> ml_collections.ConfigDict:
    """Every fine-tuning setting with its default; configs/sft_*.py change a few.

    The model fields are every app's (llama2_jax.settings.model_fields); here quantization ""
    (as stored) holds a LoRA run's frozen base as the checkpoint stores it, and full
    fine-tuning always trains unquantized weights (llama2_jax.plan.resolve_quantization).
    """
    c = settings.model_fields(ml_collections.ConfigDict())
    # Training shards weights, gradients and optimizer state over every device (FSDP).
    c.fsdp, c.tensor = -1, 1
    c.train_data = ""  # JSONL dialogs
    c.eval_data = ""  # JSONL; "" = hold out eval_fraction of train_data
    c.eval_fraction = 0.0
    c.output_dir = ""
    c.steps = 1000
    c.batch_size = 8  # sequences per optimizer step (all devices, all accumulation steps)
    c.grad_accum = 1  # micro-batches per step: batch_size / grad_accum sequences each
    c.seq_len = 1024
    c.packing = True  # several short examples per sequence (attention never crosses them)
    c.max_length_policy = data.TRUNCATE  # or "drop", for examples longer than seq_len + 1
    c.learning_rate = 2e-5
    c.warmup_steps = 100
    c.final_lr_ratio = 0.1  # cosine decay to learning_rate * this at `steps`
    c.weight_decay = 0.0  # AdamW; never applied to norms and embeddings
    c.b1 = 0.9
    c.b2 = 0.95
    c.eps = 1e-8
    c.clip_norm = 1.0  # global gradient norm; 0 = off
    c.param_dtype = "float32"  # trained (master) weights; the frozen base under LoRA too
    c.remat = False  # recompute each layer's activations in the backward pass
    # With LoRA (rank > 0) the base is frozen; `quantization` int8 | fp8 holds it in 8 bits
    # (a 7B base in ~6.7 GB instead of 13.5), "auto" lets the planner choose.
    c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets=("wq", "wv")))
    c.save_every = 500
    c.keep_checkpoints = 2
    c.eval_every = 500
    c.log_every = 10
    c.progress = True  # a progress bar on a terminal's stderr
    return c


def train(config: ml_collections.ConfigDict, err: TextIO = sys.stderr) -> dict:
    """Fine-tune as `config` says (see base_config); the Python entry point of the app.
    Raises one of llama2_jax.settings.USER_ERRORS for settings that cannot work."""
    check_settings(config)
    prepared = settings.prepare(config, err, "finetune")
    return Trainer(config, prepared, err).run()


def run(config: ml_collections.ConfigDict, err: TextIO | None = None) -> int:
    """The app for a loaded config. Returns the exit status."""
    err = sys.stderr if err is None else err
    try:
        distributed.initialize(config)
        summary = train(config, err)
    except NonFiniteLoss as e:
        err.write(f"\nerror: {e}\n")
        return 3
    except USER_ERRORS as e:
        err.write(f"error: {e}\n")
        return 1
    except KeyboardInterrupt:
        err.write("\ninterrupted; the last saved checkpoint is kept: run the same command to "
                  "resume\n")
        return 130
    return 143 if summary.get("stopped") else 0


def main(argv: Sequence[str]) -> int:
    logging.set_verbosity(logging.WARNING)
    config = cli.flag_config(argv)
    if config is None:
        return 2
    return run(config)


if __name__ == "__main__":
    cli.define_config_flag("Fine-tuning")
    app.run(main, flags_parser=cli.parse_flags)
