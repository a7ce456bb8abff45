"""Full fine-tuning of Llama 2 7B (chat or base) on your dialogs.

  python -m llama2_jax.finetune --config configs/sft_7b.py \\
      --config.checkpoint_dir=checkpoints/llama-2-7b-chat --config.train_data=dialogs.jsonl

Every weight is trained: fp32 master weights and AdamW moments are 16 bytes a parameter
(~108 GB for 7B), sharded over all devices with FSDP (`fsdp=-1`), so it needs e.g. a TPU v4-8
/ v5e-16 or 8 x 40-80 GB GPUs. On one 16-24 GB accelerator use configs/sft_7b_lora.py instead.
Compute is bfloat16 on accelerators; activations are recomputed in the backward pass (`remat`).
Preemptible hosts: rerun the same command to resume (checkpoints every `save_every` steps and
on SIGTERM).
"""

from llama2_jax.finetune import base_config


def get_config():
    c = base_config()
    c.checkpoint_dir = "checkpoints/llama-2-7b-chat"  # convert/meta_to_orbax.py output
    c.train_data = "data/train.jsonl"
    c.eval_data = ""
    c.eval_fraction = 0.02
    c.output_dir = "runs/sft_7b"
    c.steps = 1000
    c.batch_size = 64
    c.grad_accum = 4
    c.seq_len = 2048
    c.learning_rate = 2e-5
    c.warmup_steps = 50
    c.weight_decay = 0.1
    c.param_dtype = "float32"  # master weights; compute follows `dtype` (bf16 on accelerators)
    c.remat = True
    c.fsdp = -1
    c.save_every = 200
    c.eval_every = 200
    return c
