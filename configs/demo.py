"""Chat on a CPU with nothing to download: `python -m llama2_jax.chat --config configs/demo.py`.

A tiny Llama-2-shaped model with the real Llama 2 tokenizer (tests/data/tokenizer.model). Until
a trained demo checkpoint exists its weights are RANDOM, so its answers are noise: it shows the
app working (streaming, multi-turn cache, commands), not a model talking.
"""

import os

import ml_collections

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.checkpoint_dir = ""  # "" = random weights built from model_preset + model
    c.tokenizer_path = os.path.join(_ROOT, "tests", "data", "tokenizer.model")
    c.model_preset = "tiny"
    # The tokenizer's 32000 pieces, on a model small enough to start in seconds.
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=32000, dim=128, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=352,
        max_seq_len=1024))
    c.dtype = ""  # "" = bfloat16 on accelerators, float32 on CPU
    # Mesh sizes, -1 = the devices left: FSDP works with any device count (indivisible
    # dimensions are replicated), where tensor parallelism needs it to divide the 4 heads.
    c.data = 1
    c.fsdp = -1
    c.tensor = 1
    c.multihost = False
    c.system_prompt = "You are a helpful assistant."
    c.temperature = 0.6
    c.top_p = 0.9
    c.top_k = 0  # 0 = off
    c.max_new_tokens = 64
    c.seed = 0
    c.prompt = ""  # "" = interactive; else answer this one message and exit
    c.context_length = 0  # 0 = the model's (1024)
    return c
