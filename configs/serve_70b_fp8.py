"""Serve Llama-2-70b-chat in FP8 over two GPUs (tensor parallelism 2): `python -m
llama2_jax.serve --config configs/serve_70b_fp8.py --config.checkpoint_dir=...`.

Per GPU: half of the FP8 (e4m3) weights, 34.5 GB, and half of the KV cache: 70B keeps 8 KV
heads, so a position costs 320 KB in bf16, 160 KB per GPU; 16 slots x 4096 positions = 10.7 GB
per GPU. About 46 GB of an 80 GB H100 with room for activations and the prefix cache.
FP8 x FP8 matmuls (quant.NATIVE_FP8) are off: these are weight-only FP8 weights.
All fields: llama2_jax.serve.main.base_config.
"""

from llama2_jax.serve.main import base_config


def get_config():
    c = base_config()
    c.checkpoint_dir = "checkpoints/llama-2-70b-chat"
    c.model_preset = "70b"
    c.model_name = "llama-2-70b-chat"
    c.quantization = "fp8"
    c.data, c.fsdp, c.tensor = 1, 1, 2
    c.max_slots = 16
    c.context_length = 4096
    c.prefill_chunk = 512
    c.prefix_cache_mb = 2048
    return c
