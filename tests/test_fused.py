"""Per-layer CPU copies with q/k/v and w1/w3 fused into one matrix each (llama2_jax.model.fused):
the same tokens and logits as the separate matrices, only where it is safe."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama2_jax import aot
from llama2_jax.inference.adapters import Limits
from llama2_jax.inference.params import GREEDY
from llama2_jax.inference.slots import Slots
from llama2_jax.inference.weights import Weights
from llama2_jax.model import checkpoint, fused, packed, quant
from llama2_jax.model.config import TINY_GQA
from llama2_jax.model.sharding import make_mesh

CFG = TINY_GQA.replace(max_seq_len=64)  # 4 query heads, 2 KV heads: q and k/v differ in width


def run(weights: Weights, prompt, steps: int):
    """Greedy tokens and the last step's top log-probability ids of one slot."""
    slots = Slots(weights, 1, 64, chunk=8)
    for start in range(0, len(prompt), slots.chunk):
        chunk = prompt[start:start + slots.chunk]
        out = slots.prefill(0, chunk, start, start + len(chunk) == len(prompt), GREEDY)
    tokens = [int(np.asarray(out.tokens)[0])]
    for _ in range(steps):
        out = slots.decode()
        tokens.append(int(np.asarray(out.tokens)[0]))
    return tokens, np.asarray(out.logprob)


def unpacked(w) -> np.ndarray:
    """A weight's values as [in, out] (a packed one's tiles put back side by side)."""
    if isinstance(w, packed.Packed):  # where the CPU kernels run, Weights packs its copies
        a = np.asarray(w.w)
        return a.transpose(1, 0, 2).reshape(a.shape[1], -1)[:, :w.n]
    return np.asarray(w)


def test_fused_layers_give_the_separate_matrices_tokens(one_device_mesh):
    model = checkpoint.random_model(CFG, one_device_mesh, seed=3)
    plain, merged = Weights(model, unstack=True), Weights(model, unstack=True, fuse=True)
    assert not plain.fused and merged.fused
    layer = nnx.to_pure_dict(merged.unstacked[1])
    qkv, gate_up = layer["attention"]["wq"], layer["feed_forward"]["w1"]
    assert isinstance(qkv, fused.FusedQKV) and isinstance(gate_up, fused.FusedGateUp)
    d, h = CFG.dim, CFG.head_dim
    stacked = checkpoint.params_of(model)["layers"]
    want = np.concatenate([np.asarray(stacked["attention"][t][1]).reshape(d, -1)
                           for t in ("wq", "wk", "wv")], axis=-1)
    assert qkv.w.shape == (d, (CFG.n_heads + 2 * CFG.n_kv_heads) * h)
    np.testing.assert_array_equal(unpacked(qkv.w), want)
    np.testing.assert_array_equal(unpacked(gate_up.w), np.concatenate(
        [np.asarray(stacked["feed_forward"][t][1]) for t in ("w1", "w3")], axis=-1))
    assert len(merged.leaves) < len(plain.leaves)  # wk, wv, w3 hold no arrays

    prompt = [5, 9, 200, 17, 3, 3, 41, 250, 8, 1, 77]  # two prefill chunks of 8
    tokens, logprob = run(plain, prompt, 12)
    fused_tokens, fused_logprob = run(merged, prompt, 12)
    assert fused_tokens == tokens
    np.testing.assert_allclose(fused_logprob, logprob, rtol=1e-5, atol=1e-5)


def test_only_float_weights_on_one_device_are_fused(one_device_mesh):
    model = checkpoint.random_model(CFG, one_device_mesh, seed=3)
    assert not Weights(model, unstack=False, fuse=True).fused  # no per-layer copies
    assert not Weights(quant.quantize_model(model, "int8"), unstack=True, fuse=True).fused
    sharded = checkpoint.random_model(CFG, make_mesh(devices=jax.devices()[:2], tensor=2),
                                      seed=3)
    assert not Weights(sharded, unstack=True, fuse=True).fused


def test_adapters_refuse_fused_weights(one_device_mesh):
    model = checkpoint.random_model(CFG, one_device_mesh, seed=3)
    with pytest.raises(ValueError, match="fuse=False"):
        Slots(Weights(model, unstack=True, fuse=True), 2, 32, adapters=Limits(2, 4, ("wq",)))


def test_abstract_fused_weights_lower(one_device_mesh):
    """Abstract weights (the planner's) take the fused layout too."""
    slots = aot.abstract_slots(CFG, one_device_mesh, slots=2, length=32, chunk=8, fuse=True)
    assert slots.weights.fused
    qkv = nnx.to_pure_dict(slots.weights.unstacked[0])["attention"]["wq"]
    w = qkv.w.w if isinstance(qkv.w, packed.Packed) else qkv.w  # packed for the CPU kernels
    assert isinstance(w, jax.ShapeDtypeStruct) and w.dtype == jnp.dtype(CFG.weight_dtype)
    names = [name for name, _ in slots.lower_steps(every=False)]
    assert any(n.startswith("decode") for n in names)
