"""`--verify`: the converted model's logits against Hugging Face transformers on the source weights.

Both sides run in float32 and one after the other, so the check needs about 4 bytes per parameter
of RAM at a time (plus the source mapping): 28 GB for 7B.
"""

from __future__ import annotations

import gc

import numpy as np

from convert import mapping
from convert.common import ConversionError

TOLERANCE = 1e-2  # of the largest logit


def probe_tokens(vocab_size: int, n: int = 8) -> list[int]:
    """A fixed token sequence (BOS first) valid for any vocabulary."""
    return [1] + [(3 + 37 * i) % vocab_size for i in range(1, n)]


def reference_from_source(source):
    """HF LlamaForCausalLM (float32) holding `source`'s weights, q/k permuted for HF."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = source.cfg
    state = {}
    for path, layer, name in mapping.hf_names(cfg):
        w = mapping.jax_to_hf(path, source.read(path, layer, np.float32), cfg)
        state[name] = torch.from_numpy(w)
    config = LlamaConfig(**mapping.hf_config_dict(cfg, "float32"))
    return LlamaForCausalLM.from_pretrained(None, config=config, state_dict=state,
                                            dtype=torch.float32).eval()


def reference_from_dir(hf_dir: str):
    import torch
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def compare(checkpoint_dir: str, make_reference, tokens: list[int] | None = None) -> float:
    """Max |logits difference| between the checkpoint and `make_reference()` on a few tokens.

    Prints it with the argmax agreement and raises ConversionError if it is beyond rounding;
    the reference is built only after our model is freed.
    """
    import torch

    import llama2_jax
    from llama2_jax.model import checkpoint
    model = checkpoint.load(checkpoint_dir, dtype="float32")
    tokens = tokens or probe_tokens(model.config.vocab_size)
    ours = llama2_jax.forward(model, tokens)
    del model
    gc.collect()
    reference = make_reference()
    with torch.no_grad():
        theirs = reference(torch.as_tensor([tokens])).logits[0].float().numpy()
    del reference
    gc.collect()
    diff = float(np.abs(ours - theirs).max())
    scale = float(np.abs(theirs).max())
    agree = float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))
    print(f"verify: {len(tokens)} tokens, max |logit difference| vs transformers = {diff:.3g} "
          f"(logits up to {scale:.3g}), argmax agreement {agree:.0%}", flush=True)
    if diff > TOLERANCE * max(1.0, scale):  # float32 rounding is ~1e-5 of it; a bug is O(1)
        raise ConversionError(f"{checkpoint_dir}: logits differ from transformers' by "
                              f"{diff:.3g} (> {TOLERANCE:g} x {max(1.0, scale):.3g}): the "
                              "conversion is wrong")
    return diff
