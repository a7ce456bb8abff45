"""Train the chat demo's model: `python -m llama2_jax.finetune --config configs/sft_demo.py`.

configs/demo.py runs this itself on first use (about 1.5 minutes on a 2-core CPU) and then
chats with `<output_dir>/final`. A tiny Llama-2-shaped model (dim 128, 2 layers, the real Llama
2 tokenizer) learns the 69 prompts of configs/data/demo_dialogs.jsonl (greetings, counting,
a few facts about llama2_jax) by heart: it answers those recognisably, and little else.
"""

import os

import ml_collections

from llama2_jax.finetune import base_config

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DIR = os.path.join("~", ".cache", "llama2_jax", "demo-v1")


def get_config():
    c = base_config()
    c.tokenizer_path = os.path.join(_ROOT, "tests", "data", "tokenizer.model")
    c.model_preset = "tiny"
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=32000, dim=128, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=352,
        max_seq_len=1024))
    c.train_data = os.path.join(_ROOT, "configs", "data", "demo_dialogs.jsonl")
    c.output_dir = DEMO_DIR
    c.steps = 180
    c.batch_size = 4
    c.seq_len = 128
    c.learning_rate = 5e-3
    c.warmup_steps = 10
    c.final_lr_ratio = 0.05
    c.save_every = 50
    c.eval_every = 0
    c.log_every = 25
    c.keep_checkpoints = 1
    return c
