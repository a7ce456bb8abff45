"""Chat on a CPU with nothing to download: `python -m llama2_jax.chat --config configs/demo.py`.

A tiny Llama-2-shaped model with the real Llama 2 tokenizer (tests/data/tokenizer.model). Until
a trained demo checkpoint exists its weights are RANDOM, so its answers are noise: it shows the
app working (streaming, multi-turn cache, commands), not a model talking.
"""

import os

import ml_collections

from llama2_jax.chat import base_config

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
    c = base_config()
    c.tokenizer_path = os.path.join(_ROOT, "tests", "data", "tokenizer.model")
    c.model_preset = "tiny"
    # The tokenizer's 32000 pieces, on a model small enough to start in seconds.
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=32000, dim=128, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=352,
        max_seq_len=1024))
    c.fsdp, c.tensor = -1, 1  # any device count (tensor parallelism must divide the 4 heads)
    c.system_prompt = "You are a helpful assistant."
    c.max_new_tokens = 64
    return c
