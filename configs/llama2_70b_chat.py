"""Chat with Llama-2-70b-chat: `python -m llama2_jax.chat --config configs/llama2_70b_chat.py`.

Convert Meta's weights into `checkpoint_dir` first (convert/meta_to_orbax.py or
convert/hf_to_orbax.py), or point `--config.checkpoint_dir=` at a converted checkpoint.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.checkpoint_dir = "checkpoints/llama-2-70b-chat"
    c.tokenizer_path = ""  # "" = <checkpoint_dir>/tokenizer.model
    # With checkpoint_dir "": random weights of this shape (smoke tests on new hardware).
    c.model_preset = "70b"
    c.model = ml_collections.ConfigDict()  # ModelConfig fields over the preset (random only)
    c.dtype = ""  # "" = bfloat16 on accelerators, float32 on CPU
    # Mesh sizes, -1 = the devices left: tensor parallelism is the fastest for one conversation.
    c.data = 1
    c.fsdp = 1
    c.tensor = -1
    c.multihost = False
    c.system_prompt = ""
    c.temperature = 0.6
    c.top_p = 0.9
    c.top_k = 0  # 0 = off
    c.max_new_tokens = 512
    c.seed = 0
    c.prompt = ""  # "" = interactive; else answer this one message and exit
    c.context_length = 0  # 0 = the model's (4096)
    return c
