"""Chat with Llama-2-13b-chat: `python -m llama2_jax.chat --config configs/llama2_13b_chat.py`.

Convert Meta's or Hugging Face's weights into `checkpoint_dir` first (convert/meta_to_orbax.py,
convert/hf_to_orbax.py), or point `--config.checkpoint_dir=` at a converted checkpoint. All
fields and their defaults: `llama2_jax.chat.base_config`.
"""

from llama2_jax.chat import base_config


def get_config():
    c = base_config()
    c.checkpoint_dir = "checkpoints/llama-2-13b-chat"
    c.model_preset = "13b"  # with --config.checkpoint_dir="": random weights of this shape
    # "auto": the planner (python -m llama2_jax.plan) picks the mesh and, when the weights in
    # their dtype do not fit the devices present, int8; "none" / "int8" / "fp8" fix it;
    # "" = as the checkpoint stores it. The choice is printed at start.
    c.mesh = "auto"
    c.quantization = "auto"
    return c
