"""Numerics against Hugging Face transformers (PyTorch, fp32) and cache/batch consistency."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama2_jax
from llama2_jax.model import checkpoint
from llama2_jax.model.config import TINY
from llama2_jax.model.transformer import init_cache
from tests import hf_reference as ref

CONFIGS = {"mha": TINY, "gqa": TINY.replace(n_kv_heads=2), "mqa": TINY.replace(n_kv_heads=1)}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, one_device_mesh):
    """(config, HF model, our model with the same weights)."""
    cfg = CONFIGS[request.param]
    hf = ref.hf_model(cfg, seed=1)
    ours = checkpoint.from_params(cfg, ref.params_from_hf(hf, cfg), one_device_mesh)
    return cfg, hf, ours


def test_logits_match_hf(pair):
    cfg, hf, ours = pair
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (3, 40))
    want = ref.hf_logits(hf, tokens)
    positions = np.broadcast_to(np.arange(40), tokens.shape)
    got, cache = ours(jnp.asarray(tokens), jnp.asarray(positions))
    assert cache is None and got.dtype == jnp.float32
    assert np.abs(want).max() > 1.0  # logits large enough for the comparison to mean something
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(llama2_jax.forward(ours, tokens[0].tolist()), want[0], atol=1e-4,
                               rtol=0)


def test_greedy_generation_matches_hf(pair):
    cfg, hf, ours = pair
    prompt = np.random.RandomState(1).randint(3, cfg.vocab_size, 9).tolist()
    want = ref.hf_greedy(hf, prompt, 24)
    got = llama2_jax.generate(ours, [prompt], max_new_tokens=24, temperature=0, stop_ids=[])
    assert got == [want]


@pytest.fixture(scope="module")
def gqa(one_device_mesh):
    cfg = CONFIGS["gqa"]
    return cfg, checkpoint.from_params(cfg, ref.params_from_hf(ref.hf_model(cfg, seed=2), cfg),
                                       one_device_mesh)


def test_cached_prefill_and_decode_equal_full_forward(gqa):
    cfg, ours = gqa
    run = nnx.jit(lambda m, t, p, c: m(t, p, c))
    tokens = np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 20))
    positions = np.broadcast_to(np.arange(20), tokens.shape)
    full, _ = ours(jnp.asarray(tokens), jnp.asarray(positions))
    cache = init_cache(cfg, 2, 32)
    logits, cache = run(ours, jnp.asarray(tokens[:, :12]), jnp.asarray(positions[:, :12]), cache)
    steps = [logits]
    for t in range(12, 20):
        logits, cache = run(ours, jnp.asarray(tokens[:, t:t + 1]),
                            jnp.asarray(positions[:, t:t + 1]), cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], axis=1),
                               np.asarray(full), atol=1e-5, rtol=0)


def test_bfloat16_runs_close_to_float32(one_device_mesh):
    cfg = TINY
    hf = ref.hf_model(cfg, seed=4)
    params = ref.params_from_hf(hf, cfg)
    f32 = checkpoint.from_params(cfg, params, one_device_mesh)
    bf16 = checkpoint.from_params(cfg.with_dtype("bfloat16"), params, one_device_mesh)
    leaves = jax.tree.leaves(checkpoint.params_of(bf16))
    assert {x.dtype for x in leaves} == {jnp.dtype("bfloat16")}
    tokens = list(range(5, 30))
    a, b = llama2_jax.forward(f32, tokens), llama2_jax.forward(bf16, tokens)
    assert b.dtype == np.float32  # logits are float32 whatever the compute dtype
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9


def test_layer_count_does_not_grow_the_program():
    """80 stacked layers lower to the same program as 2 (scan), so 70B compiles like 2 layers."""
    from llama2_jax.model.config import LLAMA2_70B
    from llama2_jax.model.transformer import Blocks, KVCache, abstract_model

    def lowered_ops(cfg):
        graphdef, state = nnx.split(abstract_model(cfg))
        tokens = jax.ShapeDtypeStruct((1, 16), jnp.int32)
        shape = (cfg.n_layers, 1, cfg.n_kv_heads, 64, cfg.head_dim)
        cache = Blocks(((KVCache(*[jax.ShapeDtypeStruct(shape, cfg.compute_dtype)] * 2),),))
        fn = jax.jit(lambda s, t, c: nnx.merge(graphdef, s)(t, t, c))
        text = fn.lower(state, tokens, cache).as_text()
        return sum(1 for line in text.splitlines() if " = " in line)

    big = LLAMA2_70B.with_dtype("bfloat16")
    small = big.replace(n_layers=2)
    assert lowered_ops(big) == lowered_ops(small)
