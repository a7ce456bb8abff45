"""The CPU decode attention kernel (llama2_jax.model.cpu_kernels) against XLA's attention over
the same cache, the sampler's floor kernel against Meta's top-p, and the engine with and without
the kernels (its matmul kernel over packed weights: tests/test_packed.py)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from llama2_jax.model import cpu_kernels, kv_cache

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason="the CPU kernel could not be built here")


def random_blocks(rng, groups, blocks, K, H, dtype, quantization="none"):
    cache = kv_cache.init_blocks(None, groups, blocks, K, H, dtype, quantization)

    def fill(x):
        if x.dtype == jnp.int8:
            return jnp.asarray(rng.integers(-127, 128, x.shape), jnp.int8)
        if x.ndim == 3 and quantization != "none" and x.dtype == jnp.float32 and \
                x.shape[-1] != H:  # scales [R, K, S]
            return jnp.asarray(rng.random(x.shape) * 0.05 + 1e-3, jnp.float32)
        return jnp.asarray(rng.standard_normal(x.shape), x.dtype)
    return kv_cache.map_arrays(lambda x, axes: fill(x), cache)


@pytest.mark.parametrize("G, dtype, quantization", [
    (1, jnp.float32, "none"), (4, jnp.float32, "none"), (2, jnp.bfloat16, "none"),
    (1, jnp.float32, "int8"), (2, jnp.float32, "fp8")])
def test_kernel_equals_xla_attention_over_each_rows_own_positions(G, dtype, quantization):
    rng = np.random.default_rng(0)
    K, H, blocks = 3, 16, (32, 32, 16)
    total = sum(blocks)
    cache = random_blocks(rng, (1, 3, 12), blocks, K, H, dtype, quantization)
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
    assert cpu_kernels.ATTENTION in text  # the kernel is what runs
    got, want = map(np.asarray, both(q, cache, positions))
    live = pos < total
    np.testing.assert_allclose(got[live], want[live], rtol=2e-5, atol=2e-5)
    assert not got[~live].any()  # an idle row: zeros


def test_kernel_is_not_used_where_it_does_not_apply():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, 1, 2, 1, 8)), jnp.float32)
    pos = jnp.array([[3], [5]], jnp.int32)
    stacked = kv_cache.init_blocks(2, (2,), (8,), 2, 8, jnp.float32)  # [L, ...] layers
    text = jax.jit(lambda q, c: kv_cache.attention(q, c, 0, pos, kernel=True)).lower(
        q, stacked).as_text()
    assert cpu_kernels.ATTENTION not in text
    # several positions per row (prefill) stay XLA's too
    cache = kv_cache.init_blocks(None, (2,), (8,), 2, 8, jnp.float32)
    q2 = jnp.concatenate([q, q], axis=1)
    text = jax.jit(lambda q, c: kv_cache.attention(q, c, 0, jnp.concatenate([pos, pos + 1], 1),
                                                   kernel=True)).lower(q2, cache).as_text()
    assert cpu_kernels.ATTENTION not in text


def test_a_failing_compiler_is_named_and_leaves_no_library(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA2_JAX_KERNEL_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="false failed on cpu_attention.cc, cpu_sampling.cc"):
        cpu_kernels.build(compiler="/bin/false")
    assert list(tmp_path.iterdir()) == []  # no partial library under any name


@pytest.mark.parametrize("kv_quantization", ["none", "int8"])
def test_engine_decodes_the_same_with_and_without_the_kernels(one_device_mesh, kv_quantization):
    from llama2_jax.inference.params import GREEDY, SamplingParams
    from llama2_jax.inference.slots import Slots
    from llama2_jax.inference.weights import EngineOptions, Weights
    from llama2_jax.model import checkpoint
    from llama2_jax.model.config import TINY

    model = checkpoint.random_model(TINY.replace(n_kv_heads=2, max_seq_len=128),
                                    one_device_mesh, seed=3)
    # A greedy row and a top-p row over a random model's flat distribution (the floor search
    # runs), of different lengths.
    prompts = {0: ([1, 5, 9, 200, 7], GREEDY),
               2: (list(range(3, 40)), SamplingParams(temperature=0.8, top_p=0.9, seed=5))}
    runs = {}
    for on in (True, False):
        weights = Weights(model, options=EngineOptions(cpu_kernels=on))
        assert weights.cpu_kernels is on
        slots = Slots(weights, 4, 128, chunk=64, kv_block=16, kv_quantization=kv_quantization)
        decode = [lowered.as_text() for name, lowered in slots.lower_steps(every=False)
                  if name.startswith("decode")]
        assert decode and all((cpu_kernels.ATTENTION in t and cpu_kernels.FLOOR in t
                               and cpu_kernels.MATMUL in t) is on for t in decode)
        assert weights.packed is on  # and the weights' matmuls through the kernel
        for slot, (prompt, params) in prompts.items():
            slots.prefill(slot, prompt, 0, True, params)
        steps = [slots.decode() for _ in range(16)]
        runs[on] = [np.array([np.asarray(getattr(s, f))[[0, 2]] for s in steps])
                    for f in ("tokens", "logprob")]
    np.testing.assert_array_equal(runs[True][0], runs[False][0])
    np.testing.assert_allclose(runs[True][1], runs[False][1], rtol=1e-4, atol=1e-4)


def meta_kept(x, k, top_p):
    """float64 reference: the tokens of row x that top-k then Meta's top-p keep (sorted by
    probability, a token stays while the mass before it is at most top_p)."""
    x = np.asarray(x, np.float64)
    order = np.argsort(-x, kind="stable")[:k]
    w = np.exp(x[order] - x[order[0]])
    probs = w / w.sum()
    before = np.cumsum(probs) - probs
    keep = order[before <= top_p] if top_p < 1 else order
    kept = np.zeros(len(x), bool)
    kept[keep] = True
    return kept


def test_nucleus_floor_keeps_what_meta_top_p_keeps():
    from llama2_jax.inference import sampling

    rng = np.random.default_rng(2)
    V = 3000
    rows, ks, ps = [], [], []
    for scale in (0.1, 1.0, 4.0):  # flat to peaked
        for k, p in [(V, 0.9), (V, 0.5), (V, 0.05), (V, 1.0), (700, 0.9), (10, 1.0), (1, 0.5)]:
            rows.append(rng.standard_normal(V) * scale)
            ks.append(k)
            ps.append(p)
    masked = rng.standard_normal(V)
    masked[rng.random(V) < 0.9] = -np.inf  # a grammar's mask: most tokens out
    rows.append(masked), ks.append(V), ps.append(0.8)
    x = jnp.asarray(np.stack(rows), jnp.float32)
    k, top_p = jnp.asarray(ks, jnp.int32), jnp.asarray(ps, jnp.float32)
    want = jnp.ones(len(ks), bool).at[3].set(False)
    got = np.asarray(jax.jit(cpu_kernels.nucleus_floor)(x, k, top_p, want))
    bisected = np.asarray(jax.jit(sampling._bisect_floor)(x, k, top_p))[:, 0]
    xs = np.asarray(x)
    for i in range(len(ks)):
        if i == 3:
            assert got[i] == -np.inf  # not wanted
            continue
        want_kept = meta_kept(xs[i], ks[i], ps[i])
        np.testing.assert_array_equal(xs[i] >= got[i], want_kept, err_msg=f"row {i}")
        np.testing.assert_array_equal(xs[i] >= bisected[i], want_kept, err_msg=f"row {i}")


def test_nucleus_floor_keeps_ties_together_as_the_bisection_does():
    from llama2_jax.inference import sampling

    x = jnp.asarray([[3.0, 1.0, 1.0, 1.0, 0.5, 1.0, -2.0, np.nan]], jnp.float32)
    for p in (0.3, 0.6, 0.95):
        k, top_p = jnp.asarray([8], jnp.int32), jnp.asarray([p], jnp.float32)
        got = cpu_kernels.nucleus_floor(x, k, top_p, jnp.asarray([True]))
        bisected = sampling._bisect_floor(x[:, :7], k - 1, top_p)[:, 0]  # no NaN for XLA's
        assert np.array_equal(np.asarray(x[0, :7] >= got), np.asarray(x[0, :7] >= bisected))


def test_sampler_draws_the_same_tokens_with_the_kernel():
    from llama2_jax.inference.sampling import RowSampling, sample_rows

    rng = np.random.default_rng(4)
    B, V = 12, 4000
    scale = np.array([0.05, 0.5, 3.0, 8.0] * 3)[:, None]  # flat to peaked rows
    x = jnp.asarray(rng.standard_normal((B, V)) * scale, jnp.float32)
    s = RowSampling(
        temperature=jnp.asarray([0.0, 0.7, 1.0, 0.6] * 3, jnp.float32),
        top_p=jnp.asarray([1.0, 0.9, 0.5, 0.95, 1.0, 0.3, 0.9, 0.99, 0.8, 1.0, 0.7, 0.6],
                          jnp.float32),
        top_k=jnp.asarray([0, 0, 40, 0, 5, 0, 1000, 0, 0, 3, 0, 200], jnp.int32),
        key=jax.vmap(jax.random.key_data)(jax.random.split(jax.random.key(0), B)).astype(
            jnp.uint32),
        count=jnp.arange(B, dtype=jnp.int32),
        min_p=jnp.asarray([0.0] * 8 + [0.05, 0.0, 0.1, 0.0], jnp.float32))
    draws = {}
    for kernel in (True, False):
        step = jax.jit(sample_rows, static_argnums=2)
        draws[kernel] = np.stack([np.asarray(step(x, s._replace(count=s.count + i), kernel))
                                  for i in range(20)])
    np.testing.assert_array_equal(draws[True], draws[False])
