"""Chat with Llama-2-70b-chat: `python -m llama2_jax.chat --config configs/llama2_70b_chat.py`.

Convert Meta's or Hugging Face's weights into `checkpoint_dir` first (convert/meta_to_orbax.py,
convert/hf_to_orbax.py), or point `--config.checkpoint_dir=` at a converted checkpoint. All
fields and their defaults: `llama2_jax.chat.base_config`.
"""

from llama2_jax.chat import base_config


def get_config():
    c = base_config()
    c.checkpoint_dir = "checkpoints/llama-2-70b-chat"
    c.model_preset = "70b"  # with --config.checkpoint_dir="": random weights of this shape
    # "fp8" or "int8": 69 GB of weights, one 80 GB GPU; "" = as the checkpoint stores it
    c.quantization = ""
    return c
