"""Weights packed in tiles (llama2_jax.model.packed) and the CPU matmul kernel over them, against
numpy in float64; where Weights packs, and what it leaves alone."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from llama2_jax.model import cpu_kernels, packed

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason="the CPU kernels could not be built here")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17])
def test_packed_matmul_equals_numpy(dtype, rows):
    rng = np.random.default_rng(rows)
    k, n = 37, 70  # n not a multiple of the tile: zero columns padded, cut off again
    w = jnp.asarray(rng.standard_normal((k, n)), dtype)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
    p = packed.pack(w)
    assert p.w.shape == (3, k, packed.TILE) and p.shape == (k, n)
    got = jax.jit(lambda x, p: packed.Packed.einsum(p, "BD,DQ->BQ", x))(x, p)
    want = np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.float32), np.float64)
    assert got.dtype == jnp.float32 and got.shape == (rows, n)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_packed_weight_reads_as_the_array_it_stands_for():
    rng = np.random.default_rng(0)
    D, N, H = 16, 4, 8
    wq = jnp.asarray(rng.standard_normal((D, N, H)), jnp.float32)
    wo = jnp.asarray(rng.standard_normal((N, H, D)), jnp.float32)
    pq, po = packed.pack(wq), packed.pack(wo, n_in=2)
    assert pq.shape == (D, N, H) and po.shape == (N, H, D) and pq[...] is pq
    assert pq.dtype == jnp.float32 and pq.ndim == 3
    x = jnp.asarray(rng.standard_normal((2, 3, D)), jnp.float32)  # [B, T, D]
    q = pq.reshape(D, N * H).einsum("BTD,DQ->BTQ", x)
    np.testing.assert_allclose(q, jnp.einsum("BTD,DQ->BTQ", x, wq.reshape(D, N * H)),
                               rtol=1e-5, atol=1e-5)
    y = po.reshape(N * H, D).einsum("BTQ,QD->BTD", q)
    np.testing.assert_allclose(y, jnp.einsum("BTQ,QD->BTD", q, wo.reshape(N * H, D)),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"cannot view a packed weight of shape \(16, 4, 8\)"):
        pq.reshape(D * N, H)  # would move inputs into the outputs
    with pytest.raises(ValueError, match="multiplies x"):
        pq.reshape(D, N * H).einsum("BQ,DQ->BD", x[0])  # not a contraction of x's last axis


def test_only_plain_float_arrays_on_one_device_are_packed():
    from llama2_jax.model.quant import quantize
    a = jnp.ones((64, 32), jnp.float32)
    assert packed.packable(a) and packed.packable(a.astype(jnp.bfloat16))
    assert not packed.packable(a.astype(jnp.float16))  # the kernel reads f32 and bf16 only
    assert not packed.packable(quantize(a, "int8", n_in=1))
    assert not packed.packable(jnp.ones((64,), jnp.float32))
    spec = packed.pack(jax.ShapeDtypeStruct((64, 40), jnp.bfloat16))  # an abstract model's
    assert spec.w.shape == (2, 64, packed.TILE) and spec.shape == (64, 40)


def test_weights_pack_their_copies_only_where_the_kernels_run(one_device_mesh):
    from llama2_jax.inference.weights import EngineOptions, Weights
    from llama2_jax.model import checkpoint
    from llama2_jax.model.config import TINY

    model = checkpoint.random_model(TINY, one_device_mesh, seed=1)
    for fuse in (False, True):
        weights = Weights(model, fuse=fuse)
        assert weights.packed
        _, unstacked = weights.model(weights.leaves)
        layer = unstacked[0]
        wq = layer["attention"]["wq"][...]
        assert isinstance(wq.w if fuse else wq, packed.Packed)
        assert isinstance(layer["feed_forward"]["w2"][...], packed.Packed)
        assert isinstance(weights.state["output"][...], packed.Packed)
        assert not isinstance(weights.state["tok_embeddings"][...], packed.Packed)
    assert isinstance(model.output[...], jax.Array)  # the caller's model is untouched
    off = Weights(model, options=EngineOptions(cpu_kernels=False))
    assert not off.packed and isinstance(off.state["output"][...], jax.Array)
    scanned = Weights(model, unstack=False)  # layers scanned from the stack: nothing packed
    assert not scanned.packed and isinstance(scanned.state["output"][...], jax.Array)


def test_a_packed_weight_without_the_kernel_says_so(monkeypatch):
    p = packed.pack(jnp.ones((8, 32), jnp.float32))
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    with pytest.raises(RuntimeError, match="needs the CPU matmul kernel"):
        p.einsum("BD,DQ->BQ", jnp.ones((1, 8), jnp.float32))
