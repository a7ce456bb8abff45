"""Llama 2 in Flax NNX, top to bottom.

Shape letters used in einsums and comments:
  B batch, T query length, S key/cache length, D model dim, N query heads, K key/value heads,
  G query heads per KV head (N = K * G), H head dim, F feed-forward width, V vocabulary,
  L layers.

Parameter names and RoPE layout are Meta's (`tok_embeddings`, `attention.wq`, ...; interleaved
rotary pairs), stored einsum-friendly: `wq` is [D, N, H], `wo` [N, H, D], `w1` [D, F], `output`
[D, V]. The layers are one stacked `Block` (every parameter has a leading L axis) run with
`lax.scan`, so the 80-layer 70B compiles like a 1-layer model.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

from llama2_jax.model import fused, kv_cache
from llama2_jax.model.config import ModelConfig
from llama2_jax.model.kv_cache import Blocks, KVCache  # noqa: F401  (re-exported)
from llama2_jax.model.sharding import constrain

f32 = jnp.float32


def init_cache(cfg: ModelConfig, batch: int, length: int) -> Blocks:
    """A zero cache of `batch` rows and `length` positions: one group, one block."""
    return kv_cache.init_blocks(cfg.n_layers, (batch,), (length,), cfg.n_kv_heads,
                                cfg.head_dim, cfg.compute_dtype)


@runtime_checkable
class Weight(Protocol):
    """What `linear` takes besides a plain array: a weight that multiplies `x` itself.

    Implemented by llama2_jax.model.quant.QArray (8-bit weights) and
    llama2_jax.training.lora.LoRA (a
    frozen weight plus a low-rank update). Such a weight is a pytree (it passes through jit and
    `lax.scan` over stacked layers) with the logical shape of the array it stands for.
    """

    @property
    def shape(self) -> tuple[int, ...]: ...

    def einsum(self, eq: str, x: jax.Array, out_dtype=None) -> jax.Array:
        """`jnp.einsum(eq, x, W)` for this weight W, in `out_dtype` (None: x's dtype)."""
        ...


def linear(eq: str, x: jax.Array, w: "jax.Array | Weight", out_dtype=None) -> jax.Array:
    """Every weight matmul goes through here, so quantized weights plug in at one spot.

    `w` is an array or a `Weight` (a quantized weight, a LoRA-adapted one).
    """
    if isinstance(w, Weight):
        return w.einsum(eq, x, out_dtype)
    return jnp.einsum(eq, x, w.astype(x.dtype), preferred_element_type=out_dtype)


def _param(rngs: nnx.Rngs, cfg: ModelConfig, shape, axes, stack: int | None, init="normal"):
    if stack is not None:
        shape, axes = (stack, *shape), ("layers", *axes)
    if init == "ones":
        value = jnp.ones(shape, cfg.weight_dtype)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, f32)).astype(cfg.weight_dtype)
    return nnx.Param(value, axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack: int | None = None):
        self.eps = cfg.norm_eps
        self.weight = _param(rngs, cfg, (cfg.dim,), ("embed",), stack, init="ones")

    def __call__(self, x):  # [..., D]
        x32 = x.astype(f32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.weight[...].astype(x.dtype)


def rope_angles(positions: jax.Array, head_dim: int, theta: float):
    """cos, sin of Meta's rotary frequencies at `positions` [B, T]: each [B, T, 1, H/2]."""
    freqs = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=f32) / head_dim))  # [H/2]
    angles = positions.astype(f32)[..., None] * freqs  # [B, T, H/2]
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, T, N, H], as Meta's complex product."""
    xr = x.astype(f32).reshape(*x.shape[:-1], -1, 2)  # [B, T, N, H/2, 2]
    x0, x1 = xr[..., 0], xr[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack: int | None = None):
        d, n, k, h = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = _param(rngs, cfg, (d, n, h), ("embed", "heads", "head_dim"), stack)
        self.wk = _param(rngs, cfg, (d, k, h), ("embed", "kv_heads", "head_dim"), stack)
        self.wv = _param(rngs, cfg, (d, k, h), ("embed", "kv_heads", "head_dim"), stack)
        self.wo = _param(rngs, cfg, (n, h, d), ("heads", "head_dim", "embed"), stack)

    def __call__(self, x, positions, cos, sin, mask_extra=None, kv=None, layer=None,
                 attend=None, read_only=False, cpu_kernel=False):
        """x [B, T, D]; positions [B, T]; kv: the cache (Blocks) or None.

        Query at position p sees positions s <= p: the batch's own tokens (and `mask_extra`
        [B, T, S] if given) without a cache; with one, its slots after this call's keys and
        values are written (only its first `attend` slots, static, are read). Returns the
        output [B, T, D] and the updated cache; with `read_only`, the cache is only read and
        (k, v) [B, T, K, H] come back in its place, for the caller to write.
        """
        B, T, D = x.shape
        wq = self.wq[...]
        N, H = wq.shape[-2:]
        if isinstance(wq, fused.FusedQKV):  # a per-layer CPU copy: one matmul
            K = wq.kv_heads
            qkv = linear("BTD,DQ->BTQ", x, wq.w)
            q, k, v = jnp.split(qkv, [N * H, (N + K) * H], axis=-1)
            q, k, v = q.reshape(B, T, N, H), k.reshape(B, T, K, H), v.reshape(B, T, K, H)
        else:
            K = self.wk.shape[-2]
            # Weights enter the matmuls as 2-D [in, out] views (free reshapes): XLA then
            # needs no transposed copies of them.
            q = linear("BTD,DQ->BTQ", x, wq.reshape(D, N * H)).reshape(B, T, N, H)
            k = linear("BTD,DQ->BTQ", x, self.wk[...].reshape(D, K * H)).reshape(B, T, K, H)
            v = linear("BTD,DQ->BTQ", x, self.wv[...].reshape(D, K * H)).reshape(B, T, K, H)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = q.reshape(B, T, K, N // K, H)  # [B, T, K, G, H]
        if kv is None:
            keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S=T, H]
            mask = positions[:, None, :] <= positions[:, :, None]  # [B, T, S]
            if mask_extra is not None:
                mask = mask & mask_extra
            out = kv_cache.attend_over(q, [keys], [values], mask)
        elif read_only:
            out = kv_cache.attention_before(q, kv, layer, k, v, positions, attend)
            kv = (k, v)
        else:
            kv = kv_cache.write(kv, k, v, layer, positions)
            out = kv_cache.attention(q, kv, layer, positions, attend,
                                     cpu_kernel)  # [B, T, K, G, H]
        out = out.reshape(B, T, N * H)
        return linear("BTQ,QD->BTD", out, self.wo[...].reshape(N * H, D)), kv


class FeedForward(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack: int | None = None):
        d, f = cfg.dim, cfg.ffn_dim
        self.w1 = _param(rngs, cfg, (d, f), ("embed", "mlp"), stack)
        self.w2 = _param(rngs, cfg, (f, d), ("mlp", "embed"), stack)
        self.w3 = _param(rngs, cfg, (d, f), ("embed", "mlp"), stack)

    def __call__(self, x):  # [B, T, D]
        w1 = self.w1[...]
        if isinstance(w1, fused.FusedGateUp):  # a per-layer CPU copy: one matmul
            gate, up = jnp.split(linear("BTD,DF->BTF", x, w1.w), 2, axis=-1)
        else:
            gate, up = linear("BTD,DF->BTF", x, w1), linear("BTD,DF->BTF", x, self.w3[...])
        return linear("BTF,FD->BTD", jax.nn.silu(gate) * up, self.w2[...])


class Block(nnx.Module):
    """One transformer layer; built with `stack=L` it holds all L layers' weights."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack: int | None = None):
        self.attention = Attention(cfg, rngs, stack)
        self.feed_forward = FeedForward(cfg, rngs, stack)
        self.attention_norm = RMSNorm(cfg, rngs, stack)
        self.ffn_norm = RMSNorm(cfg, rngs, stack)

    def __call__(self, x, positions, cos, sin, mask_extra=None, kv=None, layer=None,
                 attend=None, read_only=False, cpu_kernel=False):
        h, kv = self.attention(self.attention_norm(x), positions, cos, sin, mask_extra, kv, layer,
                               attend, read_only, cpu_kernel)
        x = x + h
        x = x + self.feed_forward(self.ffn_norm(x))
        return constrain(x, ("batch", "length", None)), kv


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.config = cfg
        self.tok_embeddings = _param(rngs, cfg, (cfg.vocab_size, cfg.dim), ("vocab", "embed"),
                                     None)
        self.layers = Block(cfg, rngs, stack=cfg.n_layers)
        self.norm = RMSNorm(cfg, rngs)
        self.output = _param(rngs, cfg, (cfg.dim, cfg.vocab_size), ("embed", "vocab"), None)

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache=None, *,
                 logits_at: jax.Array | None = None, mask_extra: jax.Array | None = None,
                 remat: bool = False, unstacked: Sequence[nnx.State] | None = None,
                 attend: int | None = None, cpu_kernel: bool = False):
        """Run the model.

        Args:
          tokens, positions: [B, T] int32. With a cache, token t of row b is written to slot
            positions[b, t] (dropped if past the cache's end).
          cache: Blocks (llama2_jax.model.kv_cache), or None for a cache-free pass
            over `tokens` alone. It may hold more rows than the batch: row b of the batch
            uses row b of the cache.
          logits_at: [B] index into T; if given, logits only there ([B, V]).
          mask_extra: [B, T, T] bool, ANDed with the causal mask (e.g. segment masks); only
            without a cache.
          remat: recompute each layer's activations in the backward pass.
          attend: with a cache, read only its first `attend` slots (static): attention then
            costs what the tokens in use need, not what the cache holds. Every query must sit
            below it; writes past it still land in the cache.
          unstacked: the layers as L separate states (`unstack_layers`), run in a Python loop
            instead of the scan; `cache` is then a tuple of L one-layer caches. XLA:CPU
            copies every scanned layer's weights out of the stack before its matmuls: on CPU
            this decodes ~1.5x faster, at the price of a second copy of the layers.
          cpu_kernel: one position per row over a per-layer cache (`unstacked`): attention
            through llama2_jax.model.cpu_kernels.decode_attention, which the caller has checked is
            `available()` and that the arrays live on one CPU device.
        Returns:
          (logits [B, T, V] or [B, V] float32, updated cache or None).
        """
        cfg = self.config
        x = jnp.take(self.tok_embeddings[...], tokens, axis=0).astype(cfg.compute_dtype)
        x = constrain(x, ("batch", "length", None))  # [B, T, D]
        cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
        graphdef, stacked = nnx.split(self.layers)

        def body(carry, xs):
            h, kv = carry
            layer_state, layer = xs
            block = nnx.merge(graphdef, layer_state)
            h, kv = block(h, positions, cos, sin, mask_extra, kv, layer, attend,
                          cpu_kernel=cpu_kernel)
            return (h, kv), None

        if remat:
            body = jax.checkpoint(body)
        if unstacked is not None:
            caches = [None] * len(unstacked) if cache is None else cache
            new = []
            for layer_state, c in zip(unstacked, caches):
                (x, kv), _ = body((x, c), (layer_state, 0))
                new.append(kv)
            cache = None if cache is None else tuple(new)
        elif cache is None:
            (x, _), _ = jax.lax.scan(body, (x, None), (stacked, jnp.arange(cfg.n_layers)))
        else:
            # The scanned layers only read the cache and return their keys/values, written
            # once after the loop: a cache carried through the scan, written and read in each
            # iteration, costs XLA (TPU and CPU) a copy of all of it (benchmarks/RESULTS.md).
            def read_only(h, xs):
                layer_state, layer = xs
                block = nnx.merge(graphdef, layer_state)
                return block(h, positions, cos, sin, None, cache, layer, attend, True)

            x, (k, v) = jax.lax.scan(read_only, x, (stacked, jnp.arange(cfg.n_layers)))
            cache = kv_cache.write_layers(cache, k, v, positions)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]  # [B, D]
        x = self.norm(x)
        logits = linear("...D,DV->...V", x, self.output[...], out_dtype=f32)
        return logits, cache


def unstack_layers(model: Transformer) -> tuple[nnx.State, ...]:
    """Each layer's weights as a separate state (a copy), for `Transformer(unstacked=...)`."""
    _, stacked = nnx.split(model.layers)
    return tuple(jax.tree.map(lambda a, i=i: _layer(a, i), stacked)
                 for i in range(model.config.n_layers))


def _layer(a, i: int):
    """Layer i of a stacked array, or of a ShapeDtypeStruct (an abstract model)."""
    if not isinstance(a, jax.ShapeDtypeStruct):
        return a[i]
    s = a.sharding
    if isinstance(s, jax.sharding.NamedSharding):
        s = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*s.spec[1:]))
    return jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=s)


def init_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    return Transformer(cfg, nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig) -> Transformer:
    """The model with ShapeDtypeStruct leaves: nothing allocated (for 7B-70B shapes)."""
    return nnx.eval_shape(lambda: init_model(cfg))


def param_count(model: Transformer) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
