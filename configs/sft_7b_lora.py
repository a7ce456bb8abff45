"""LoRA fine-tuning of Llama 2 7B on one 16-24 GB accelerator (Colab/Kaggle T4 x2, L4, A10, a
TPU v3/v4 core, ...).

  python -m llama2_jax.finetune --config configs/sft_7b_lora.py \\
      --config.checkpoint_dir=checkpoints/llama-2-7b-chat --config.train_data=dialogs.jsonl

The base weights stay frozen in bfloat16 (13.5 GB); only rank-`lora.rank` adapters on the
attention and MLP projections are trained (40M parameters at rank 16; with their fp32 AdamW
state ~0.5 GB). Activations are recomputed in the backward pass. At the end the adapters are merged
into the base and `<output_dir>/final` is a plain llama2_jax checkpoint for the chat app.

Memory (estimated in benchmarks/RESULTS.md, no accelerator measured yet): ~17 GiB with the bf16
base, so a 24 GB card; for a 16 GB card hold the base in 8 bits, `--config.quantization=int8`
(~11 GiB).
"""

import ml_collections

from llama2_jax.finetune import base_config


def get_config():
    c = base_config()
    c.checkpoint_dir = "checkpoints/llama-2-7b-chat"
    c.train_data = "data/train.jsonl"
    c.eval_fraction = 0.02
    c.output_dir = "runs/sft_7b_lora"
    c.steps = 1000
    c.batch_size = 16
    c.grad_accum = 8  # micro-batches of 2 x 1024 tokens
    c.seq_len = 1024
    c.learning_rate = 2e-4
    c.warmup_steps = 50
    c.dtype = "bfloat16"
    c.param_dtype = "bfloat16"  # the frozen base; adapters and their optimizer are fp32
    c.remat = True
    c.lora = ml_collections.ConfigDict(dict(rank=16, alpha=32.0,
                                            targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3")))
    c.save_every = 200
    c.eval_every = 200
    return c
