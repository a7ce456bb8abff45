"""Name and layout tables between Meta / Hugging Face tensors and llama2_jax parameters.

Pure numpy, one tensor at a time, so converters can stream. llama2_jax keeps Meta's names and
interleaved RoPE layout; Hugging Face permutes the rows of q/k for its rotate-half RoPE, and
that permutation lives here and nowhere else.
"""

from __future__ import annotations

import re

import numpy as np

# Per-layer llama2_jax parameter path -> Meta tensor suffix (after "layers.{i}.").
LAYER_META = {
    ("attention", "wq"): "attention.wq.weight",
    ("attention", "wk"): "attention.wk.weight",
    ("attention", "wv"): "attention.wv.weight",
    ("attention", "wo"): "attention.wo.weight",
    ("feed_forward", "w1"): "feed_forward.w1.weight",
    ("feed_forward", "w2"): "feed_forward.w2.weight",
    ("feed_forward", "w3"): "feed_forward.w3.weight",
    ("attention_norm", "weight"): "attention_norm.weight",
    ("ffn_norm", "weight"): "ffn_norm.weight",
}
GLOBAL_META = {
    ("tok_embeddings",): "tok_embeddings.weight",
    ("norm", "weight"): "norm.weight",
    ("output",): "output.weight",
}
LAYER_HF = {
    ("attention", "wq"): "self_attn.q_proj.weight",
    ("attention", "wk"): "self_attn.k_proj.weight",
    ("attention", "wv"): "self_attn.v_proj.weight",
    ("attention", "wo"): "self_attn.o_proj.weight",
    ("feed_forward", "w1"): "mlp.gate_proj.weight",
    ("feed_forward", "w2"): "mlp.down_proj.weight",
    ("feed_forward", "w3"): "mlp.up_proj.weight",
    ("attention_norm", "weight"): "input_layernorm.weight",
    ("ffn_norm", "weight"): "post_attention_layernorm.weight",
}
GLOBAL_HF = {
    ("tok_embeddings",): "model.embed_tokens.weight",
    ("norm", "weight"): "model.norm.weight",
    ("output",): "lm_head.weight",
}


def meta_to_jax(path: tuple[str, ...], w: np.ndarray, cfg) -> np.ndarray:
    """One Meta tensor (torch Linear layout [out, in]) -> llama2_jax layout."""
    name = path[-1]
    d, h = cfg.dim, cfg.head_dim
    if name in ("wq", "wk", "wv"):
        return w.T.reshape(d, -1, h)  # [D, N|K, H]
    if name == "wo":
        return w.T.reshape(-1, h, d)  # [N, H, D]
    if name in ("w1", "w2", "w3", "output"):
        return w.T
    return w  # embeddings [V, D], norm weights [D]


def jax_to_meta(path: tuple[str, ...], w: np.ndarray, cfg) -> np.ndarray:
    name = path[-1]
    if name in ("wq", "wk", "wv"):
        return w.reshape(cfg.dim, -1).T
    if name == "wo":
        return w.reshape(-1, cfg.dim).T
    if name in ("w1", "w2", "w3", "output"):
        return w.T
    return w


def hf_unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half q/k rows [n*H, D] -> Meta interleaved rows."""
    out, d = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, d).swapaxes(1, 2).reshape(out, d)


def hf_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta interleaved q/k rows [n*H, D] -> HF rotate-half rows (inverse of hf_unpermute)."""
    out, d = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, d).swapaxes(1, 2).reshape(out, d)


def hf_to_jax(path: tuple[str, ...], w: np.ndarray, cfg) -> np.ndarray:
    if path[-1] == "wq":
        w = hf_unpermute(w, cfg.n_heads)
    elif path[-1] == "wk":
        w = hf_unpermute(w, cfg.n_kv_heads)
    return meta_to_jax(path, w, cfg)


def jax_to_hf(path: tuple[str, ...], w: np.ndarray, cfg) -> np.ndarray:
    w = jax_to_meta(path, w, cfg)
    if path[-1] == "wq":
        w = hf_permute(w, cfg.n_heads)
    elif path[-1] == "wk":
        w = hf_permute(w, cfg.n_kv_heads)
    return w


def source_names(cfg, layer_table, global_table, layer_prefix):
    """(llama2_jax path, layer index or None, source tensor name) for every parameter."""
    for path, name in global_table.items():
        yield path, None, name
    for i in range(cfg.n_layers):
        for path, name in layer_table.items():
            yield ("layers", *path), i, f"{layer_prefix}{i}.{name}"


def meta_names(cfg):
    return source_names(cfg, LAYER_META, GLOBAL_META, "layers.")


def hf_names(cfg):
    return source_names(cfg, LAYER_HF, GLOBAL_HF, "model.layers.")


def params_from_state_dict(state: dict, cfg, kind: str) -> dict:
    """Whole nested llama2_jax param dict from a flat Meta or HF state dict of numpy arrays.

    Holds everything in memory: for tests and small models; converters stream instead.
    """
    names, to_jax = {"meta": (meta_names, meta_to_jax), "hf": (hf_names, hf_to_jax)}[kind]
    tied = kind == "hf" and "lm_head.weight" not in state
    params: dict = {}
    stacks: dict = {}
    for path, layer, name in names(cfg):
        if tied and name == "lm_head.weight":
            name = "model.embed_tokens.weight"
        w = to_jax(path, np.asarray(state[name]), cfg)
        if layer is None:
            _set(params, path, w)
        else:
            stacks.setdefault(path, []).append(w)
    for path, ws in stacks.items():
        _set(params, path, np.stack(ws))
    return params


def _set(tree: dict, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


LAYER_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.")
