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


def save_random_adapters(root: str, cfg, count: int, rank: int, targets, base_dir=None,
                         seed: int = 0) -> list[str]:
    """`count` random LoRA adapters (a ~ N(0, 1/in), b ~ N(0, 0.02), alpha = 2 x rank) of a
    model of `cfg`, saved as root/adapter1..; their directories."""
    from llama2_jax.model import adapter
    rng = np.random.default_rng(seed)
    dirs = []
    for k in range(1, count + 1):
        params: dict = {}
        for t, (a_shape, b_shape) in adapter.shapes(cfg, targets, rank).items():
            params.setdefault("layers", {}).setdefault(adapter.TARGETS[t][0], {})[t] = {
                "a": rng.normal(0, a_shape[1] ** -0.5, a_shape).astype(np.float32),
                "b": rng.normal(0, 0.02, b_shape).astype(np.float32)}
        dirs.append(os.path.join(root, f"adapter{k}"))
        adapter.save(dirs[-1], adapter.Adapter(params, rank, 2.0 * rank,
                                               adapter.base_record(cfg, base_dir)))
    return dirs
