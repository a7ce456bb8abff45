"""Fine-tune a tiny random-init model on the demo dialogs: a CPU smoke run, well under a minute.

  python -m llama2_jax.finetune --config configs/sft_tiny.py

The model is Llama-2-shaped but tiny (dim 64, 2 layers) with the real Llama 2 tokenizer; the
loss falls from ~10.4 (uniform over 32000 pieces) within the run. configs/sft_demo.py trains
the model the chat demo uses; configs/sft_7b*.py are the real runs.
"""

import os

import ml_collections

from llama2_jax.finetune import base_config

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
    c = base_config()
    c.tokenizer_path = os.path.join(_ROOT, "tests", "data", "tokenizer.model")
    c.model_preset = "tiny"
    c.model = ml_collections.ConfigDict(dict(vocab_size=32000, dim=64, n_layers=2, n_heads=4,
                                             n_kv_heads=2, ffn_dim=176, max_seq_len=256))
    c.train_data = os.path.join(_ROOT, "configs", "data", "demo_dialogs.jsonl")
    c.eval_fraction = 0.1
    c.output_dir = "runs/sft_tiny"
    c.steps = 30
    c.batch_size = 8
    c.seq_len = 128
    c.learning_rate = 3e-3
    c.warmup_steps = 5
    c.save_every = 10
    c.eval_every = 10
    c.log_every = 5
    return c
