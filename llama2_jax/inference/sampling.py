"""The one sampler: every row of a batch draws with its own settings (per-row arrays), so one
compiled step serves any mix of greedy and sampled rows; and log-probabilities.

A sampled row keeps the tokens whose logit is at least its `floor` and draws one of them by
inverse CDF in vocabulary order with one uniform number per row. The floor is what top-k and
Meta's top-p leave (see `SamplingParams`), found without sorting the vocabulary:

  candidates  `lax.top_k` of CANDIDATES logits per row (a partial sort) holds the floor when
              top_k <= CANDIDATES, or when the nucleus ends inside them: the usual case for a
              trained model, and whenever a client sends top_k (40 by default in many tools);
  bisection   otherwise (a flat distribution, top-p over thousands of tokens): the floor is
              found by bisection over the logits' 32-bit order, 32 masked sums per threshold,
              for the batch only when one of its sampled rows needs it.
On one CPU device (steps over `Weights.cpu_kernels`) neither: a custom call
(llama2_jax.model.cpu_kernels.nucleus_floor) finds every sampled row's floor in three passes
over its row, 3-4x faster than the bisection alone (benchmarks/RESULTS.md, issue 19).

A row that the candidates resolve always takes their floor, whichever branch its batch runs, so
a row's tokens never depend on what else is batched with it.

On CPU, the argmax and the top-k of a row (`argmax`, `top_k`) go through blocks of BLOCK
tokens: the maximum of each block first, then the few blocks that can hold the answer.
XLA:CPU's argmax (a reduction over value and index pairs) and `lax.top_k` over a whole
32,000-token row are many times slower than these (benchmarks/RESULTS.md, issue 19); the
results, ties included, are theirs. Other platforms keep jnp.argmax and lax.top_k (picked by
`lax.platform_dependent`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llama2_jax.inference.params import TOP_LOGPROBS
from llama2_jax.model import cpu_kernels

f32, i32, u32 = jnp.float32, jnp.int32, jnp.uint32
CANDIDATES = 64  # logits per row the cheap path ranks
DRAW_BLOCK = 128  # the inverse CDF sums blocks of this many tokens, then one block's tokens
BLOCK = 128  # argmax and top-k: tokens per block


class RowSampling(NamedTuple):
    """Sampling settings of every row of a batch, as arrays, so one compiled step serves any mix.

    temperature [B] float32 (0 = greedy), top_p [B] float32 in (0, 1], top_k [B] int32 (0 = off),
    key [B, 2] uint32 (the row's own PRNG key), count [B] int32 (tokens the row has drawn: its
    n-th token uses fold_in(key, n), so a row's draws depend on its own key alone), min_p [B]
    float32 (0 = off; None: off for every row).
    """

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    key: jax.Array
    count: jax.Array
    min_p: jax.Array | None = None


def sample_rows(logits: jax.Array, s: RowSampling, cpu_kernel: bool = False) -> jax.Array:
    """One token per row of logits [B, V] with row b's own settings; [B] int32.

    Greedy rows (temperature 0) take the argmax. Sampled rows: logits / temperature, then
    top-k (tokens at least as probable as the k-th), then Meta's top-p over what is left
    (tokens in order of probability are kept while the mass before them is at most top_p),
    and of those the ones at least min_p times as probable as the most probable token,
    drawn with `uniform(fold_in(key, count))` (`draw`). The sampled work runs only when some
    row samples. `cpu_kernel`: every sampled row's floor by
    llama2_jax.model.cpu_kernels.nucleus_floor (the caller has checked that it is available
    and the logits are on one CPU device) instead of the candidates and the bisection.
    """
    greedy = argmax(logits)
    sampling = s.temperature > 0

    def sampled():
        x = logits.astype(f32) / jnp.where(sampling, s.temperature, 1.0)[:, None]
        floor = nucleus_floor(x, s.top_k, s.top_p, sampling, cpu_kernel)
        if s.min_p is not None:  # p >= min_p * p_max, in logits
            least = x.max(axis=-1) + jnp.log(jnp.where(s.min_p > 0, s.min_p, 1.0))
            floor = jnp.maximum(floor, jnp.where(s.min_p > 0, least, -jnp.inf)[:, None])
        u = uniforms(s.key, s.count)
        return jnp.where(sampling, draw(x, floor, u), greedy)

    return jax.lax.cond(jnp.any(sampling), sampled, lambda: greedy)


def _blocks(x: jax.Array) -> jax.Array:
    """x [B, V] as [B, ceil(V / BLOCK), BLOCK], padded with -inf."""
    B, V = x.shape
    nb = -(-V // BLOCK)
    return jnp.pad(x, ((0, 0), (0, nb * BLOCK - V)), constant_values=-jnp.inf).reshape(
        B, nb, BLOCK)


def argmax(x: jax.Array) -> jax.Array:
    """[B] int32: jnp.argmax(x, axis=-1) of x [B, V] (the first of equal maxima); on CPU the
    block holding the first maximum, then the first maximum inside it."""
    def plain(x):
        return jnp.argmax(x, axis=-1).astype(i32)
    if x.shape[-1] <= 2 * BLOCK:
        return plain(x)
    return jax.lax.platform_dependent(x, cpu=_blocked_argmax, default=plain)


def _blocked_argmax(x: jax.Array) -> jax.Array:
    xb = _blocks(x)
    blk = jnp.argmax(xb.max(axis=-1), axis=-1)  # [B]
    inner = jnp.take_along_axis(xb, blk[:, None, None], axis=1)[:, 0]  # [B, BLOCK]
    return (blk * BLOCK + jnp.argmax(inner, axis=-1)).astype(i32)


def top_k(x: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """(values [B, n], ids [B, n] int32): `lax.top_k(x, n)` of x [B, V], ties to the lower id.

    On CPU: the n largest lie in the n blocks with the largest maxima (a block left out has n blocks
    at least as large before it); those blocks, in vocabulary order, are ranked with
    lax.top_k, so equal values still go to the lower id."""
    def plain(x):
        values, ids = jax.lax.top_k(x, n)
        return values, ids.astype(i32)
    if x.shape[-1] < 2 * n * BLOCK:
        return plain(x)
    return jax.lax.platform_dependent(x, cpu=lambda x: _blocked_top_k(x, n), default=plain)


def _blocked_top_k(x: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    xb = _blocks(x)
    blocks = jnp.sort(jax.lax.top_k(xb.max(axis=-1), n)[1], axis=-1)  # [B, n] ascending
    picked = jnp.take_along_axis(xb, blocks[:, :, None], axis=1)  # [B, n, BLOCK]
    values, at = jax.lax.top_k(picked.reshape(x.shape[0], n * BLOCK), n)
    ids = jnp.take_along_axis(blocks, at // BLOCK, axis=-1) * BLOCK + at % BLOCK
    return values, ids.astype(i32)


def mask_rows(logits: jax.Array, constrained: jax.Array, allowed: jax.Array) -> jax.Array:
    """logits [B, V] with -inf where a constrained row's bitmask allowed [B, W] int32 (bit
    t % 32 of word t // 32 for token t) leaves a token out; rows not `constrained` [B] keep
    theirs. Only computed when some row is constrained."""
    def masked():
        v = jnp.arange(logits.shape[-1])
        bits = (jnp.take(allowed, v // 32, axis=1) >> (v % 32).astype(i32)) & 1  # [B, V]
        return jnp.where(constrained[:, None] & (bits == 0), -jnp.inf, logits)

    return jax.lax.cond(jnp.any(constrained), masked, lambda: logits)


def uniforms(key: jax.Array, count: jax.Array) -> jax.Array:
    """[B] float32 in [0, 1): row b's uniform number for its count[b]-th token."""
    keys = jax.vmap(jax.random.fold_in)(key, count)
    return jax.vmap(lambda k: jax.random.uniform(k, (), f32))(keys)


def nucleus_floor(x: jax.Array, top_k: jax.Array, top_p: jax.Array,
                  sampling: jax.Array, cpu_kernel: bool = False) -> jax.Array:
    """[B, 1]: the smallest logit of x [B, V] that top-k then top-p keep (tokens >= it are kept).
    Only rows where `sampling` is True need a right answer."""
    V = x.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    if cpu_kernel:  # every sampled row's floor in a few passes (masses in float64)
        return cpu_kernels.nucleus_floor(x, k, top_p, sampling)[:, None]
    floor, resolved = _candidate_floor(x, k, top_p)
    return jax.lax.cond(
        jnp.any(sampling & ~resolved),
        lambda: jnp.where(resolved[:, None], floor, _bisect_floor(x, k, top_p)),
        lambda: floor)


def _candidate_floor(x, k, top_p):
    """(floor [B, 1], resolved [B]) from the CANDIDATES largest logits of each row."""
    V = x.shape[-1]
    n = min(CANDIDATES, V)
    vals = top_k(x, n)[0]  # [B, n], largest first
    small_k = k <= n
    kth = jnp.take_along_axis(vals, (jnp.minimum(k, n) - 1)[:, None], axis=-1)  # [B, 1]
    in_k = vals >= jnp.where(small_k[:, None], kth, -jnp.inf)
    masked = jnp.where(in_k, vals, -jnp.inf)
    # Probabilities over the top-k set (all inside the candidates), or over the whole
    # vocabulary (no top-k): then the candidates hold the nucleus only if it ends among them.
    log_z = jnp.where(small_k, jax.nn.logsumexp(masked, axis=-1), jax.nn.logsumexp(x, axis=-1))
    probs = jnp.exp(masked - log_z[:, None])
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum((mass_before <= top_p[:, None]) & in_k, axis=-1)  # >= 1
    floor = jnp.take_along_axis(vals, (jnp.maximum(kept, 1) - 1)[:, None], axis=-1)
    floor = jnp.where(small_k[:, None], jnp.maximum(floor, kth), floor)
    # top_p 1 is no top-p (the mass before the last token may round to just over 1).
    whole = top_p[:, None] >= 1.0
    floor = jnp.where(whole, jnp.where(small_k[:, None], kth, -jnp.inf), floor)
    resolved = small_k | ((k == V) & ((top_p >= 1.0) | (mass_before[:, -1] > top_p)))
    return floor, resolved


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys in the order of the float32 values x (monotone both ways)."""
    bits = jax.lax.bitcast_convert_type(x, u32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _from_keys(keys: jax.Array) -> jax.Array:
    bits = jnp.where(keys >> 31 == 1, keys & jnp.uint32(0x7FFFFFFF), ~keys)
    return jax.lax.bitcast_convert_type(bits, f32)


def _bisect(lo, hi, good):
    """The largest t in [lo, hi) with good(t), given good(lo) and not good(hi) (per row,
    uint32 [B]); 32 halvings cover any uint32 interval."""
    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = good(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)
    return jax.lax.fori_loop(0, 32, body, (lo, hi))[0]


def _bisect_floor(x, k, top_p):
    """[B, 1]: the floor over the whole vocabulary, by bisection over `_order_keys`."""
    V = x.shape[-1]
    keys = _order_keys(x)  # [B, V]
    lowest, highest = keys.min(axis=-1), keys.max(axis=-1)

    def kth_key():  # the largest t with at least k keys >= t: the k-th largest key
        return _bisect(lowest, highest + 1,
                       lambda t: jnp.sum(keys >= t[:, None], axis=-1) >= k)

    kth = jax.lax.cond(jnp.any(k < V), kth_key, lambda: lowest)
    w = jnp.where(keys >= kth[:, None], jnp.exp(x - x.max(axis=-1, keepdims=True)), 0.0)
    target = top_p * w.sum(axis=-1)

    # Meta's rule: a token stays when the mass above it is at most top_p (of the top-k mass).
    # The floor is the smallest key with that mass <= target: one below the largest key t
    # whose mass above is still > target (bisected from kth - 1, where it is all of it).
    def above(t):
        return jnp.sum(jnp.where(keys > t[:, None], w, 0.0), axis=-1) > target

    over = _bisect(jnp.maximum(kth, 1) - 1, highest, above)
    floor = jnp.where(top_p >= 1.0, kth, over + 1)
    return _from_keys(floor)[:, None]


def draw(x: jax.Array, floor: jax.Array, u: jax.Array) -> jax.Array:
    """[B] int32: for each row of x [B, V], the first token (in vocabulary order) at which the
    running sum of exp(x) over the tokens x >= floor [B, 1] passes u [B] times their total.

    In vocabulary order, not the order of probability: logits that differ in their last bits
    (another batch, another attention length) then change a draw only at the nucleus' edge
    instead of reordering near-ties. Sums blocks of DRAW_BLOCK tokens, then inside one block,
    so no scan runs over the whole vocabulary.
    """
    B, V = x.shape
    w = jnp.where(x >= floor, jnp.exp(x - x.max(axis=-1, keepdims=True)), 0.0)
    nb = -(-V // DRAW_BLOCK)
    w = jnp.pad(w, ((0, 0), (0, nb * DRAW_BLOCK - V))).reshape(B, nb, DRAW_BLOCK)
    block_sums = jnp.cumsum(w.sum(axis=-1), axis=-1)  # [B, nb]
    target = u * block_sums[:, -1]
    blk = jnp.minimum(jnp.sum(block_sums <= target[:, None], axis=-1), nb - 1)  # [B]
    before = jnp.where(blk > 0, jnp.take_along_axis(block_sums, jnp.maximum(blk - 1, 0)[:, None],
                                                     axis=-1)[:, 0], 0.0)
    inner = jnp.take_along_axis(w, blk[:, None, None], axis=1)[:, 0]  # [B, DRAW_BLOCK]
    j = jnp.sum(before[:, None] + jnp.cumsum(inner, axis=-1) <= target[:, None], axis=-1)
    # Rounding may point past the block's last kept token: take that token instead.
    last = DRAW_BLOCK - 1 - jnp.argmax((inner > 0)[:, ::-1], axis=-1)
    return (blk * DRAW_BLOCK + jnp.minimum(j, last)).astype(i32)


def logprobs(logits: jax.Array, tokens: jax.Array, want_top: jax.Array):
    """Log-probabilities under the model's own distribution (float32 logits, before any
    temperature): of `tokens` [B], and the TOP_LOGPROBS most likely tokens of every row,
    computed only when some row wants them (`want_top` [B] bool; else zeros).

    Returns (chosen [B] float32, top_ids [B, TOP_LOGPROBS] int32, top [B, TOP_LOGPROBS]).
    """
    logits = logits.astype(f32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - lse
    n = min(TOP_LOGPROBS, logits.shape[-1])

    def top():
        values, ids = top_k(logits, n)
        return ids, values - lse[:, None]

    def none():
        return jnp.zeros((logits.shape[0], n), i32), jnp.zeros((logits.shape[0], n), f32)

    top_ids, top_lp = jax.lax.cond(jnp.any(want_top), top, none)
    return chosen, top_ids, top_lp
