"""The one sampler (`sample_rows`, per-row settings) against Meta's `sample_top_p` (PyTorch, as in
llama/generation.py), and the settings type every door uses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llama2_jax.inference.params import GREEDY, SamplingParams, sampling_params
from llama2_jax.inference import sampling
from llama2_jax.inference.sampling import RowSampling, sample_rows

N = 4000  # draws per check


def meta_nucleus(probs: np.ndarray, p: float) -> set:
    """The tokens Meta's sample_top_p can return (its masking, written in torch)."""
    probs_t = torch.tensor(probs)
    probs_sort, probs_idx = torch.sort(probs_t, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    return set(probs_idx[probs_sort > 0].tolist())


def rows(temperature, top_p, top_k, seeds, count=0):
    b = len(temperature)
    return RowSampling(jnp.asarray(temperature, jnp.float32), jnp.asarray(top_p, jnp.float32),
                       jnp.asarray(top_k, jnp.int32),
                       jnp.asarray([SamplingParams(seed=s).key() for s in seeds]),
                       jnp.full(b, count, jnp.int32))


def draws(params: SamplingParams, logits, seed=0):
    """N rows of the same logits and settings, row i seeded seed + i."""
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (N, len(logits)))
    s = rows([params.temperature] * N, [params.top_p] * N, [params.top_k] * N,
             range(seed, seed + N))
    return np.asarray(jax.jit(sample_rows)(batch, s))


LOGITS = np.log(np.array([0.30, 0.25, 0.20, 0.10, 0.06, 0.04, 0.03, 0.02]))


@pytest.mark.parametrize("top_p", [0.5, 0.56, 0.9, 0.99])
def test_top_p_stays_in_metas_nucleus_with_renormalised_mass(top_p):
    probs = np.exp(LOGITS)
    nucleus = meta_nucleus(probs[None], top_p)
    got = draws(SamplingParams(temperature=1.0, top_p=top_p), LOGITS)
    assert set(got.tolist()) == nucleus  # never outside, and every member reachable
    idx = sorted(nucleus)
    want = probs[idx] / probs[idx].sum()
    freq = np.bincount(got, minlength=len(probs))[idx] / N
    np.testing.assert_allclose(freq, want, atol=0.03)


def test_top_k_stays_in_top_k():
    got = draws(SamplingParams(temperature=1.0, top_p=1.0, top_k=3), LOGITS)
    assert set(got.tolist()) == {0, 1, 2}
    got = draws(SamplingParams(temperature=5.0, top_p=1.0, top_k=1), LOGITS)
    assert set(got.tolist()) == {0}


def test_temperature_sharpens():
    hot = draws(SamplingParams(temperature=2.0, top_p=1.0), LOGITS)
    cold = draws(SamplingParams(temperature=0.2, top_p=1.0), LOGITS)
    assert (cold == 0).mean() > 0.6 > (hot == 0).mean()


def test_same_seed_same_tokens_and_greedy():
    s = SamplingParams(temperature=1.0, top_p=0.9)
    np.testing.assert_array_equal(draws(s, LOGITS, 7), draws(s, LOGITS, 7))
    assert (draws(s, LOGITS, 7) != draws(s, LOGITS, 8)).any()
    assert set(draws(GREEDY, LOGITS).tolist()) == {0}


def test_params_defaults_and_errors():
    assert SamplingParams() == sampling_params() == SamplingParams(0.6, 0.9, 0, 0)  # Meta's
    assert GREEDY.greedy and not SamplingParams().greedy
    assert sampling_params(0.7, 0.8, None, 3) == SamplingParams(0.7, 0.8, 0, 3)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(0.6, 1.5)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(-1)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-2)


def test_rows_sample_their_own_way_in_one_batch():
    logits = np.random.RandomState(1).randn(4, 50).astype(np.float32)
    draw = jax.jit(sample_rows)
    mixed = np.asarray(draw(logits, rows([0, 1.0, 0, 0.7], [1, 0.9, 1, 1], [0, 0, 0, 3],
                                         [5, 6, 7, 8])))
    np.testing.assert_array_equal(mixed[[0, 2]], np.argmax(logits, -1)[[0, 2]])
    # a row's draw depends on its own logits, settings and key, not on the other rows
    for b, (t, p, k, s) in enumerate([(0, 1, 0, 5), (1.0, 0.9, 0, 6), (0, 1, 0, 7),
                                      (0.7, 1, 3, 8)]):
        single = draw(logits[b:b + 1], rows([t], [p], [k], [s]))
        assert int(single[0]) == int(mixed[b])
    assert mixed[3] in np.argsort(-logits[3])[:3]  # top_k=3


@pytest.mark.parametrize("top_p", [0.5, 0.9])
def test_row_top_p_stays_in_metas_nucleus(top_p):
    n = 3000
    logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (n, len(LOGITS)))
    got = np.asarray(jax.jit(sample_rows)(logits, rows([1.0] * n, [top_p] * n, [0] * n,
                                                       range(n))))
    assert set(got.tolist()) == meta_nucleus(np.exp(LOGITS)[None], top_p)
    top_k = np.asarray(jax.jit(sample_rows)(logits, rows([1.0] * n, [1.0] * n, [2] * n,
                                                         range(n))))
    assert set(top_k.tolist()) == {0, 1}


def test_row_sampling_counts_advance_the_key():
    logits = jnp.zeros((1, 1000), jnp.float32)
    draws = {int(sample_rows(logits, rows([1.0], [1.0], [0], [3], count=c))[0])
             for c in range(20)}
    assert len(draws) > 15  # each token of a request gets a fresh draw


def reference_token(logits, temperature, top_p, top_k, u):
    """Meta's masking (torch.sort, as `meta_nucleus`) after top-k, then the inverse CDF in
    vocabulary order at u, in float64: the token `sample_rows` must draw."""
    x = np.asarray(logits, np.float64) / temperature
    V = x.size
    k = min(top_k, V) if top_k else V
    kth = np.sort(x)[::-1][k - 1]
    probs = np.where(x >= kth, np.exp(x - x.max()), 0.0)
    probs /= probs.sum()
    if top_p < 1:
        keep = np.zeros(V, bool)
        keep[list(meta_nucleus(probs[None], top_p))] = True
        probs = np.where(keep, probs, 0.0)
    c = np.cumsum(probs)
    return int(np.searchsorted(c, u * c[-1], side="right"))


@pytest.mark.parametrize("vocab", [8, 300, 32000])
def test_draws_equal_metas_nucleus_and_the_inverse_cdf_on_both_paths(vocab):
    """Same logits and key: the same token as the float64 reference, whether the row's floor
    comes from the top-k candidates or from the bisection (flat logits, big nuclei)."""
    rs = np.random.RandomState(vocab)
    settings = [(0.6, 0.9, 0), (1.0, 0.5, 0), (0.7, 0.95, 40), (1.0, 1.0, 3), (0.8, 1.0, 0),
                (1.3, 0.9, 1000)]
    for scale in (0.05, 1.0, 8.0):  # flat (nucleus of thousands) to peaked (a few tokens)
        logits = (rs.randn(len(settings), vocab) * scale).astype(np.float32)
        t, p, k = (np.array(c) for c in zip(*settings))
        s = rows(t, p, k, range(len(settings)), count=5)
        got = np.asarray(jax.jit(sample_rows)(jnp.asarray(logits), s))
        u = np.asarray(sampling.uniforms(s.key, s.count))
        want = [reference_token(logits[b], t[b], p[b], k[b], u[b]) for b in range(len(t))]
        assert got.tolist() == want, (scale, got, want)


def test_floor_is_the_same_on_both_paths():
    rs = np.random.RandomState(0)
    x = (rs.randn(64, 3000) * rs.choice([0.05, 1.0, 6.0], (64, 1))).astype(np.float32)
    top_k = jnp.asarray(rs.choice([0, 0, 1, 7, 40, 64], 64), jnp.int32)
    top_p = jnp.asarray(rs.choice([0.2, 0.9, 0.99, 1.0], 64), jnp.float32)
    k = jnp.where(top_k > 0, top_k, x.shape[-1])
    cand, resolved = sampling._candidate_floor(jnp.asarray(x), k, top_p)
    bisected = sampling._bisect_floor(jnp.asarray(x), k, top_p)
    assert 0 < int(resolved.sum()) < 64  # both kinds of rows are in the test
    kept = lambda floor: x >= np.asarray(floor)  # noqa: E731
    r = np.asarray(resolved)
    np.testing.assert_array_equal(kept(cand)[r], kept(bisected)[r])


@pytest.mark.parametrize("vocab", [300, 32000, 32001])
def test_blocked_argmax_and_top_k_equal_xla_ties_included(vocab):
    """sampling.argmax / top_k go through blocks of tokens; they must give jnp.argmax's and
    lax.top_k's answers, equal values going to the lower id (integer logits: many ties)."""
    rs = np.random.RandomState(vocab)
    for x in (rs.randn(6, vocab), rs.randint(0, 4, (6, vocab)), np.zeros((6, vocab))):
        x = x.astype(np.float32)
        x[1, -1] = 50.0  # the maximum in the padded last block
        x[2, :3] = -np.inf
        for n in (1, 20, 64):
            want_v, want_i = jax.lax.top_k(x, n)
            got_v, got_i = jax.jit(sampling.top_k, static_argnums=1)(jnp.asarray(x), n)
            np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
            np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
        np.testing.assert_array_equal(np.asarray(jax.jit(sampling.argmax)(x)),
                                      np.asarray(jnp.argmax(x, axis=-1)))


def test_other_platforms_keep_xla_argmax_and_top_k():
    """The blocks are XLA:CPU's fast path only: lowered for cuda or tpu, no [B, blocks, BLOCK]
    view of the logits appears (and on CPU it does)."""
    x = jax.ShapeDtypeStruct((4, 32000), jnp.float32)
    view = f"4x{-(-32000 // sampling.BLOCK)}x{sampling.BLOCK}xf32"
    for fn in (sampling.argmax, lambda x: sampling.top_k(x, 64)):
        f = jax.jit(fn)
        assert view in f.trace(x).lower(lowering_platforms=("cpu",)).as_text()
        for platform in ("cuda", "tpu"):
            assert view not in f.trace(x).lower(lowering_platforms=(platform,)).as_text()
