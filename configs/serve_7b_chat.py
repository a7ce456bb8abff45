"""Serve Llama-2-7b-chat in 8 bits on one accelerator: `python -m llama2_jax.serve --config
configs/serve_7b_chat.py --config.checkpoint_dir=checkpoints/llama-2-7b-chat`.

Memory, per the hosted-inference target (under 10 GB), as `python -m llama2_jax.plan --model 7b
--task=serve --quantization=int8 --slots=4 --context_length=768` counts it: int8 weights
6.9 GB (quantized while loading a bf16 checkpoint, or stored so by a converter's
--quantization=int8), the bf16 KV cache at 0.5 MB per position for 4 slots and the prefill's
staging row x 768 positions = 2.0 GB, 128 MB of prefix cache, ~0.1 GB of temporaries and
0.25 GB for the layer (weights and keys/values) the scan copies out of the stacks: 9.4 GB.
Raise max_slots or context_length on a larger device (each slot x position costs 0.5 MB).
All fields: llama2_jax.serve.main.base_config.
"""

from llama2_jax.serve.main import base_config


def get_config():
    c = base_config()
    c.checkpoint_dir = "checkpoints/llama-2-7b-chat"
    c.model_preset = "7b"  # with --config.checkpoint_dir="": random weights of this shape
    c.model_name = "llama-2-7b-chat"
    c.quantization = "int8"
    c.max_slots = 4
    c.context_length = 768
    c.prefix_cache_mb = 128
    c.prefill_chunk = 512
    return c
