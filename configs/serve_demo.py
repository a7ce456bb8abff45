"""Serve the demo model on a CPU, nothing to download: `python -m llama2_jax.serve --config
configs/serve_demo.py`, then (the README's quick start):

  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "llama2_jax-demo", "messages": [{"role": "user", "content": "Hello"}]}'

The model is configs/demo.py's (fine-tuned by configs/sft_demo.py on its first start, into
~/.cache/llama2_jax/demo-v1). It was trained with the system prompt "You are a helpful
assistant.": the server adds nothing to a request's messages, so send it to get the answers it
learned. All fields: llama2_jax.serve.main.base_config.
"""

import os

from llama2_jax.serve.main import base_config

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
    c = base_config()
    c.checkpoint_dir = os.path.join("~", ".cache", "llama2_jax", "demo-v1", "final")
    c.train_config = os.path.join(_ROOT, "configs", "sft_demo.py")
    c.tokenizer_path = os.path.join(_ROOT, "tests", "data", "tokenizer.model")
    c.model_name = "llama2_jax-demo"
    c.fsdp, c.tensor = -1, 1  # any device count (tensor parallelism must divide the 4 heads)
    c.context_length = 512
    c.max_slots = 8
    c.prefill_chunk = 128
    c.prefix_cache_mb = 16
    return c
