"""Tiny random Hugging Face Llama models (PyTorch, fp32): the independent reference."""

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from convert import mapping


def hf_config(cfg, tie=False) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def hf_model(cfg, seed=0, scale=0.1, tie=False) -> LlamaForCausalLM:
    """A random HF model; weights drawn wider than HF's 0.02 so logits are not near-uniform."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config(cfg, tie)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))
    return model


def state_dict_numpy(model) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def params_from_hf(model, cfg) -> dict:
    return mapping.params_from_state_dict(state_dict_numpy(model), cfg, "hf")


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens))).logits.numpy()


def hf_greedy(model, prompt, n) -> list:
    with torch.no_grad():
        out = model.generate(torch.as_tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()
