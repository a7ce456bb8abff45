"""What the benchmarks share: medians, thread pinning, and an HF model holding our weights."""

from __future__ import annotations

import os
import statistics

import numpy as np


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def pin_threads(n: int) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if n < len(cpus):
        os.sched_setaffinity(0, cpus[:n])


def hf_model_from(params: dict, cfg):
    """A `LlamaForCausalLM` (fp32, default attention) holding llama2_jax's `params`."""
    import torch
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM

    from convert import mapping
    state = {}
    for path, layer, name in mapping.hf_names(cfg):
        w = params
        for key in path:
            w = w[key]
        w = np.asarray(w if layer is None else w[layer])
        state[name] = torch.from_numpy(np.ascontiguousarray(mapping.jax_to_hf(path, w, cfg)))
    model = LlamaForCausalLM(LlamaConfig(**mapping.hf_config_dict(cfg, "float32")))
    model.load_state_dict(state, strict=True)
    return model.eval()
