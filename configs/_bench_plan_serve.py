import importlib.util

import ml_collections

_spec = importlib.util.spec_from_file_location('base', '/work/main/configs/serve_demo.py')
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
    c = _base.get_config()
    c.checkpoint_dir = '/tmp/bp/bench134m'
    c.train_config = ""
    c.tokenizer_path = ""
    c.model_name = "bench"
    c.context_length = 1024
    c.max_slots = 16
    c.prefill_chunk = 256
    c.prefix_cache_mb = 0
    return c
