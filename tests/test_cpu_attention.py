"""The CPU decode attention kernel (llama2_jax.model.cpu_attention) against XLA's attention over
the same cache, and the engine with and without it."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from llama2_jax.model import cpu_attention, kv_cache

pytestmark = pytest.mark.skipif(not cpu_attention.available(),
                                reason="the CPU kernel could not be built here")


def random_blocks(rng, groups, blocks, K, H, dtype):
    cache = kv_cache.init_blocks(None, groups, blocks, K, H, dtype)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), cache)


@pytest.mark.parametrize("G, dtype", [(1, jnp.float32), (4, jnp.float32), (2, jnp.bfloat16)])
def test_kernel_equals_xla_attention_over_each_rows_own_positions(G, dtype):
    rng = np.random.default_rng(0)
    K, H, blocks = 3, 16, (32, 32, 16)
    total = sum(blocks)
    cache = random_blocks(rng, (1, 3, 12), blocks, K, H, dtype)
    # Block edges, the first and last position, an idle row past the end, and rows of the
    # last group left out (B = 14 < 16 rows).
    pos = np.array([0, 31, 32, 33, 63, 64, 79, total, 5, 17, 50, 70, 40, 1], np.int32)
    q = jnp.asarray(rng.standard_normal((len(pos), 1, K, G, H)), jnp.float32)
    positions = jnp.asarray(pos)[:, None]

    @jax.jit
    def both(q, cache, positions):
        return (kv_cache.attention(q, cache, 0, positions, kernel=True),
                kv_cache.attention(q, cache, 0, positions))

    text = both.lower(q, cache, positions).as_text()
    assert cpu_attention.TARGET in text  # the kernel is what runs
    got, want = map(np.asarray, both(q, cache, positions))
    live = pos < total
    np.testing.assert_allclose(got[live], want[live], rtol=2e-5, atol=2e-5)
    assert not got[~live].any()  # an idle row: zeros


def test_kernel_is_not_used_where_it_does_not_apply():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, 1, 2, 1, 8)), jnp.float32)
    pos = jnp.array([[3], [5]], jnp.int32)
    for cache in (kv_cache.init_blocks(None, (2,), (8,), 2, 8, jnp.float32, "int8"),  # 8-bit
                  kv_cache.init_blocks(2, (2,), (8,), 2, 8, jnp.float32)):  # stacked layers
        text = jax.jit(lambda q, c: kv_cache.attention(q, c, 0, pos, kernel=True)).lower(
            q, cache).as_text()
        assert cpu_attention.TARGET not in text
    # several positions per row (prefill) stay XLA's too
    cache = kv_cache.init_blocks(None, (2,), (8,), 2, 8, jnp.float32)
    q2 = jnp.concatenate([q, q], axis=1)
    text = jax.jit(lambda q, c: kv_cache.attention(q, c, 0, jnp.concatenate([pos, pos + 1], 1),
                                                   kernel=True)).lower(q2, cache).as_text()
    assert cpu_attention.TARGET not in text


def test_a_failing_compiler_is_named_and_leaves_no_library(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA2_JAX_KERNEL_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="false.* failed on .*cpu_attention.cc"):
        cpu_attention.build(compiler="/bin/false")
    assert list(tmp_path.iterdir()) == []  # no partial library under any name


def test_engine_decodes_the_same_with_and_without_the_kernel(one_device_mesh):
    from llama2_jax.inference.params import GREEDY
    from llama2_jax.inference.slots import Slots
    from llama2_jax.inference.weights import EngineOptions, Weights
    from llama2_jax.model import checkpoint
    from llama2_jax.model.config import TINY

    model = checkpoint.random_model(TINY.replace(n_kv_heads=2, max_seq_len=128),
                                    one_device_mesh, seed=3)
    prompts = {0: [1, 5, 9, 200, 7], 2: list(range(3, 40))}  # rows of different lengths
    runs = {}
    for on in (True, False):
        weights = Weights(model, options=EngineOptions(cpu_attention_kernel=on))
        assert weights.decode_kernel is on
        slots = Slots(weights, 4, 128, chunk=64, kv_block=16)
        for slot, prompt in prompts.items():
            slots.prefill(slot, prompt, 0, True, GREEDY)
        steps = [slots.decode() for _ in range(12)]
        runs[on] = [np.array([np.asarray(getattr(s, f))[[0, 2]] for s in steps])
                    for f in ("tokens", "logprob")]
    np.testing.assert_array_equal(runs[True][0], runs[False][0])
    np.testing.assert_allclose(runs[True][1], runs[False][1], rtol=1e-4, atol=1e-4)
