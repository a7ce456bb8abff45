"""Meta-format checkpoints made from tiny HF models, split the way Meta's code splits them.

Written from Meta's `llama/model.py` and HF's `convert_llama_weights_to_hf.py`, not from
convert/mapping.py, so the converter is checked against an independent description of the format.
"""

import hashlib
import json
import os

import torch

# Meta's model-parallel layers: ColumnParallelLinear shards the output dim (0), RowParallelLinear
# the input dim (1), ParallelEmbedding the embedding dim (1); RMSNorm weights are replicated.
SPLIT = {"attention.wq": 0, "attention.wk": 0, "attention.wv": 0, "attention.wo": 1,
         "feed_forward.w1": 0, "feed_forward.w2": 1, "feed_forward.w3": 0, "output": 0,
         "tok_embeddings": 1}
HF_TO_META = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
              "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
              "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
              "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
              "post_attention_layernorm": "ffn_norm"}


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's `permute` (convert_llama_weights_to_hf.py): rotate-half rows -> interleaved."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def meta_state(model, cfg) -> dict:
    """Meta-named full tensors of an HF LlamaForCausalLM."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().clone()
        if name == "model.embed_tokens.weight":
            out["tok_embeddings.weight"] = t
        elif name == "model.norm.weight":
            out["norm.weight"] = t
        elif name == "lm_head.weight":
            out["output.weight"] = t
        else:
            _, _, i, *rest = name.split(".")
            key = ".".join(rest[:-1])
            if key == "self_attn.q_proj":
                t = unpermute(t, cfg.n_heads)
            elif key == "self_attn.k_proj":
                t = unpermute(t, cfg.n_kv_heads)
            out[f"layers.{i}.{HF_TO_META[key]}.weight"] = t
    if "output.weight" not in out:  # tied
        out["output.weight"] = out["tok_embeddings.weight"].clone()
    return out


def split(state: dict, n_shards: int) -> list[dict]:
    """Meta's model-parallel shards of a full state dict (each tensor its own storage)."""
    shards = [{} for _ in range(n_shards)]
    for name, t in state.items():
        key = name[:-len(".weight")]
        key = key.split(".", 2)[2] if key.startswith("layers.") else key
        dim = SPLIT.get(key)
        parts = [t] * n_shards if dim is None else torch.chunk(t, n_shards, dim)
        for shard, p in zip(shards, parts):
            shard[name] = p.clone().contiguous()
    return shards


def params_json(cfg, vocab_size=None) -> dict:
    """Meta's params.json for `cfg` (ffn width via multiple_of/ffn_dim_multiplier, as 70B)."""
    params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
              "multiple_of": 128, "ffn_dim_multiplier": 0.75, "norm_eps": cfg.norm_eps,
              "vocab_size": cfg.vocab_size if vocab_size is None else vocab_size}
    assert cfg.dim == 64 and cfg.ffn_dim == 128, "multiple_of/multiplier above give ffn 128"
    if cfg.n_kv_heads != cfg.n_heads:
        params["n_kv_heads"] = cfg.n_kv_heads
    return params


def write_meta(directory: str, model, cfg, n_shards: int, *, dtype=torch.float32,
               vocab_size=None, checklist=True, extra=None) -> str:
    """consolidated.NN.pth + params.json (+ checklist.chk) of an HF model, as Meta ships them."""
    os.makedirs(directory, exist_ok=True)
    state = {k: v.to(dtype) for k, v in meta_state(model, cfg).items()}
    state.update(extra or {})
    files = []
    for i, shard in enumerate(split(state, n_shards)):
        files.append(f"consolidated.{i:02d}.pth")
        torch.save(shard, os.path.join(directory, files[-1]))
    with open(os.path.join(directory, "params.json"), "w") as f:
        json.dump(params_json(cfg, vocab_size), f)
    files.append("params.json")
    if checklist:
        with open(os.path.join(directory, "checklist.chk"), "w") as f:
            for name in files:
                with open(os.path.join(directory, name), "rb") as g:
                    f.write(f"{hashlib.md5(g.read()).hexdigest()}  {name}\n")
    return directory
