"""Quantized matmuls on XLA:CPU a chunk of the weight at a time (llama2_jax.model.cpu_matmul):
the same products as the whole-weight forms, their gradients, and temporaries of a chunk, not of
the weight, in the model's steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax.model import cpu_matmul, int4, quant

D_IN, D_OUT = 4096, 1024  # float32: 16 MB, more than a chunk (several iterations)


def weights(method: str, seed: int = 0) -> quant.QArray:
    rng = np.random.default_rng(seed)
    return quant.quantize(rng.standard_normal((D_IN, D_OUT)).astype(np.float32) * 0.02,
                          method, n_in=1)


def test_chunk_units_divide_and_respect_the_limit():
    assert cpu_matmul.chunk_units(86, 2 << 20, 6 << 20) == 2  # 7B w2's 86 groups: 3 fit
    assert cpu_matmul.chunk_units(32, 1 << 20, 6 << 20) == 4
    assert cpu_matmul.chunk_units(7, 10 << 20, 6 << 20) == 1  # a unit over the limit: one
    assert cpu_matmul.chunk_units(4096, 4096, 6 << 20) == 1024
    assert cpu_matmul.chunk_units(768, 8192, 6 << 20) == 384  # all would fit: two chunks
    assert cpu_matmul.chunk_units(1, 8, 6 << 20) == 1


@pytest.mark.parametrize("method", ("int8", "fp8", "int4"))
@pytest.mark.parametrize("rows", (1, 5, 96))
def test_chunked_products_equal_the_whole_weight_ones(method, rows):
    w = weights(method)
    x = jnp.asarray(np.random.default_rng(rows).standard_normal((rows, D_IN)), jnp.float32)
    want = x @ w.dequantize(jnp.float32)
    if method == "int4":
        got = int4.chunked_matmul(x, w.q, w.scale)
    else:
        got = cpu_matmul.eight_bit(x, w.q) * w.scale
    assert got.dtype == jnp.float32 and got.shape == (rows, D_OUT)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
    # through the weight's einsum (lax.platform_dependent picks the chunks on CPU), bf16 too
    np.testing.assert_allclose(w.einsum("...i,io->...o", x), want, rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(want).max()))
    bf16 = w.einsum("...i,io->...o", x.astype(jnp.bfloat16))
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(bf16.astype(jnp.float32), want, rtol=5e-2,
                               atol=2e-2 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("method", ("int8", "int4"))
def test_gradients_through_the_chunks(method):
    """A LoRA step on a quantized base differentiates through the loop."""
    w = weights(method, seed=1)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, D_IN)), jnp.float32)
    dense = w.dequantize(jnp.float32)
    got = jax.grad(lambda x: jnp.sum(jnp.sin(w.einsum("...i,io->...o", x))))(x)
    want = jax.grad(lambda x: jnp.sum(jnp.sin(x @ dense)))(x)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("method", ("int8", "int4"))
def test_temporaries_are_a_chunk_not_the_weight(method):
    """XLA:CPU's own memory_analysis(): the whole-weight form holds the weight converted to
    float32 (16 MB here); the chunked one a few chunks."""
    w = weights(method)
    x = jax.ShapeDtypeStruct((1, D_IN), jnp.float32)

    def temps(f):  # the weight an argument: a constant would be folded
        return jax.jit(f).lower(x, w).compile().memory_analysis().temp_size_in_bytes

    whole = temps(lambda x, w: x @ w.dequantize(jnp.float32))
    chunked = temps(lambda x, w: w.einsum("...i,io->...o", x))
    assert whole >= D_IN * D_OUT * 4
    assert chunked <= 2 * cpu_matmul.CHUNK_BYTES + (1 << 20), (chunked, whole)


def test_the_other_platforms_keep_the_fused_forms():
    """Lowered for a GPU/TPU, the same einsum is the whole-weight dot (no loop): XLA:TPU and
    XLA:GPU fuse the conversion themselves."""
    w = weights("int4")
    x = jax.ShapeDtypeStruct((1, D_IN), jnp.float32)
    f = jax.jit(lambda x, w: w.einsum("...i,io->...o", x))
    for platform in ("cuda", "tpu"):
        text = f.trace(x, w).lower(lowering_platforms=(platform,)).as_text()
        assert "while" not in text, platform
    assert "while" in f.lower(x, w).as_text()
