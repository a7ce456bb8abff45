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


def torch_shape(path: tuple[str, ...], cfg) -> tuple[int, ...]:
    """Shape of one layer's source tensor (Meta's and HF's alike: torch Linear [out, in]).

    Keyed by the last path key, as the layouts are ("weight": any RMSNorm).
    """
    d, f, v = cfg.dim, cfg.ffn_dim, cfg.vocab_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"wq": (q, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, q), "w1": (f, d),
            "w2": (d, f), "w3": (f, d), "tok_embeddings": (v, d), "output": (v, d),
            "weight": (d,)}[path[-1]]


def jax_shape(path: tuple[str, ...], cfg) -> tuple[int, ...]:
    """Shape of one layer's llama2_jax parameter (model.py's layout, without the L axis)."""
    d, f, v, h = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
    n, k = cfg.n_heads, cfg.n_kv_heads
    return {"wq": (d, n, h), "wk": (d, k, h), "wv": (d, k, h), "wo": (n, h, d), "w1": (d, f),
            "w2": (f, d), "w3": (d, f), "tok_embeddings": (v, d), "output": (d, v),
            "weight": (d,)}[path[-1]]


# Meta's model-parallel split (llama/model.py): ColumnParallelLinear weights are cut along
# dim 0, RowParallelLinear along dim 1, ParallelEmbedding along dim 1; norms are replicated.
META_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1,
                  "tok_embeddings": 1, "weight": None}


def meta_shard_shape(path: tuple[str, ...], cfg, n_shards: int) -> tuple[int, ...]:
    """Shape of one of `n_shards` Meta model-parallel slices of the tensor at `path`.

    Attention weights are split by whole heads (Meta's n_local_heads), so the head counts, not
    just the rows, must divide.
    """
    name = path[-1]
    shape = list(torch_shape(path, cfg))
    dim = META_SPLIT_DIM[name]
    if dim is not None:
        label, units = {"wq": ("n_heads", cfg.n_heads), "wo": ("n_heads", cfg.n_heads),
                        "wk": ("n_kv_heads", cfg.n_kv_heads),
                        "wv": ("n_kv_heads", cfg.n_kv_heads)}.get(
                            name, (f"dimension {dim} of {tuple(shape)}", shape[dim]))
        if units % n_shards:
            raise ValueError(f"{'.'.join(path)}: {label}={units} does not split into "
                             f"{n_shards} model-parallel shards")
        shape[dim] //= n_shards
    return tuple(shape)


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
    """Inverse of meta_to_jax; a view of `w` when `w` is contiguous."""
    name = path[-1]
    if name in ("wq", "wk", "wv"):
        return w.reshape(cfg.dim, -1).T
    if name == "wo":
        return w.reshape(-1, cfg.dim).T
    if name in ("w1", "w2", "w3", "output"):
        return w.T
    return w


def merge_meta_shards(path: tuple[str, ...], shards, cfg, dtype=None) -> np.ndarray:
    """Meta's model-parallel slices of one tensor -> one contiguous llama2_jax array.

    Each slice is copied (and cast to `dtype`) straight into its place in the output: one copy,
    whatever the number of shards.
    """
    dtype = np.dtype(dtype or shards[0].dtype)
    out = np.empty(jax_shape(path, cfg), dtype)
    dst = jax_to_meta(path, out, cfg)  # [out, in] view of `out`
    dim = META_SPLIT_DIM[path[-1]]
    if dim is None:  # replicated: every shard holds the whole tensor
        copy_rows(dst, shards[0])
        return out
    step = dst.shape[dim] // len(shards)
    for i, w in enumerate(shards):
        index = [slice(None)] * dst.ndim
        index[dim] = slice(i * step, (i + 1) * step)
        copy_rows(dst[tuple(index)], w)
    return out


def hf_unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half q/k rows [n*H, D] -> Meta interleaved rows."""
    out, d = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, d).swapaxes(1, 2).reshape(out, d)


def hf_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta interleaved q/k rows [n*H, D] -> HF rotate-half rows (inverse of hf_unpermute)."""
    out, d = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, d).swapaxes(1, 2).reshape(out, d)


def qk_heads(path, cfg) -> int | None:
    """The head count HF's q/k permutation runs over (None: not q or k)."""
    return {"wq": cfg.n_heads, "wk": cfg.n_kv_heads}.get(path[-1])


def hf_to_jax(path: tuple[str, ...], w: np.ndarray, cfg, dtype=None) -> np.ndarray:
    """One HF tensor -> contiguous llama2_jax array (q/k un-permuted), cast to `dtype`."""
    heads = qk_heads(path, cfg)
    if heads:
        w = hf_unpermute(w, heads)
    return merge_meta_shards(path, [w], cfg, dtype)


def jax_to_hf(path: tuple[str, ...], w: np.ndarray, cfg, dtype=None) -> np.ndarray:
    """One llama2_jax array -> contiguous HF tensor [out, in] (q/k permuted), cast to `dtype`."""
    w = jax_to_meta(path, np.asarray(w), cfg)
    out = np.empty(w.shape, np.dtype(dtype or w.dtype))
    copy_rows(out, w)
    heads = qk_heads(path, cfg)
    return hf_permute(out, heads) if heads else out


def hf_jax_view(path: tuple[str, ...], hf: np.ndarray, cfg) -> np.ndarray:
    """Writable view of a contiguous HF tensor [out, in] in llama2_jax layout.

    q/k come out as [D, N, H/2, 2] (the rotary pair axis split off): HF's permutation allows no
    [D, N, H] view, so a caller splits its data's last axis the same way.
    """
    heads = qk_heads(path, cfg)
    if heads:
        # jax[d, n, 2j + r] = hf[n*H + r*H/2 + j, d]  (hf_unpermute, then meta_to_jax)
        return hf.reshape(heads, 2, cfg.head_dim // 2, cfg.dim).transpose(3, 0, 2, 1)
    view = meta_to_jax(path, hf, cfg)
    assert np.shares_memory(view, hf)
    return view


def copy_rows(dst: np.ndarray, src: np.ndarray, block: int = 64) -> None:
    """dst[...] = src in blocks of rows: a transposing copy of a whole matrix at once thrashes
    the cache (4x slower for 7B's matrices)."""
    if dst.shape != src.shape:
        raise ValueError(f"shape {src.shape} does not fit {dst.shape}")
    if dst.ndim < 2:
        dst[...] = src
        return
    for i in range(0, dst.shape[0], block):
        dst[i:i + block] = src[i:i + block]


# -- LoRA adapters in Hugging Face PEFT's layout ------------------------------------------------
PEFT_PREFIX = "base_model.model."  # PeftModel's wrapper around LlamaForCausalLM


def peft_module(target: str) -> str:
    """A LoRA target (wq, ..., w3) -> its HF module ("self_attn.q_proj"); the last part is
    PEFT's `target_modules` name."""
    [name] = [hf for (_, weight), hf in LAYER_HF.items() if weight == target]
    return name.removesuffix(".weight")


def peft_names(target: str, layer: int) -> tuple[str, str]:
    """PEFT's tensor names of one layer's adapter of `target`: (lora_A, lora_B)."""
    stem = f"{PEFT_PREFIX}model.layers.{layer}.{peft_module(target)}"
    return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"


def lora_to_peft(target: str, a: np.ndarray, b: np.ndarray, cfg, dtype=None):
    """One layer's a [in, r] and b [r, out] -> PEFT's lora_A.weight [r, in] and lora_B.weight
    [out, r] (torch Linear layouts), contiguous and cast to `dtype`.

    B's rows are the weight's output rows, so q/k's take HF's rotate-half permutation, as the
    base's do (jax_to_hf); A's columns are the input (the hidden state), never permuted.
    """
    heads = qk_heads((target,), cfg)
    b_rows = hf_permute(b.T, heads) if heads else b.T
    return (np.ascontiguousarray(a.T, dtype or a.dtype),
            np.ascontiguousarray(b_rows, dtype or b.dtype))


def peft_to_lora(target: str, lora_a: np.ndarray, lora_b: np.ndarray, cfg, dtype=None):
    """Inverse of lora_to_peft: (a [in, r], b [r, out]) in llama2_jax's layout."""
    heads = qk_heads((target,), cfg)
    b_rows = hf_unpermute(lora_b, heads) if heads else lora_b
    return (np.ascontiguousarray(lora_a.T, dtype or lora_a.dtype),
            np.ascontiguousarray(b_rows.T, dtype or lora_b.dtype))


def hf_config_dict(cfg, dtype: str) -> dict:
    """A Hugging Face `config.json` (LlamaForCausalLM) describing `cfg`; inverse of
    llama2_jax.model.config.from_hf_config."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
    }


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
            set_path(params, path, w)
        else:
            stacks.setdefault(path, []).append(w)
    for path, ws in stacks.items():
        set_path(params, path, np.stack(ws))
    return params


def param_paths():
    """(path, stacked) of every llama2_jax parameter; stacked ones have a leading layer axis."""
    for path in GLOBAL_META:
        yield path, False
    for path in LAYER_META:
        yield ("layers", *path), True


def get_path(tree: dict, path):
    """tree[path[0]][path[1]]..."""
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path, value):
    """tree[path[0]][path[1]]... = value, creating the inner dicts."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


LAYER_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.")
