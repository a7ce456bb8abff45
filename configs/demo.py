"""Chat on a CPU with nothing to download: `python -m llama2_jax.chat --config configs/demo.py`.

A tiny Llama-2-shaped model (dim 128, 2 layers, the real Llama 2 tokenizer) fine-tuned by
llama2_jax's own SFT pipeline on configs/data/demo_dialogs.jsonl. The first start trains it
(configs/sft_demo.py, about 1.5 minutes on a 2-core CPU) into ~/.cache/llama2_jax/demo-v1;
later starts load it in seconds. It knows greetings, counting and a few facts about llama2_jax
by heart ("Hello", "Count to five.", "What is llama2_jax?", "How do I fine-tune a model?");
anything else gets a confident non-answer.
"""

import os

from llama2_jax.chat import base_config

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
    c = base_config()
    c.checkpoint_dir = os.path.join("~", ".cache", "llama2_jax", "demo-v1", "final")
    c.train_config = os.path.join(_ROOT, "configs", "sft_demo.py")
    c.tokenizer_path = os.path.join(_ROOT, "tests", "data", "tokenizer.model")
    c.fsdp, c.tensor = -1, 1  # any device count (tensor parallelism must divide the 4 heads)
    c.system_prompt = "You are a helpful assistant."
    c.max_new_tokens = 64
    return c
