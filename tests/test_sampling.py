"""Samplers against Meta's `sample_top_p` (PyTorch, as in llama/generation.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llama2_jax.inference.sampling import Greedy, Sample, make_sampler

N = 4000  # draws per check


def meta_nucleus(probs: np.ndarray, p: float) -> set:
    """The tokens Meta's sample_top_p can return (its masking, written in torch)."""
    probs_t = torch.tensor(probs)
    probs_sort, probs_idx = torch.sort(probs_t, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    return set(probs_idx[probs_sort > 0].tolist())


def draws(sampler, logits, seed=0):
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (N, len(logits)))
    return np.asarray(jax.jit(sampler)(batch, jax.random.PRNGKey(seed)))


LOGITS = np.log(np.array([0.30, 0.25, 0.20, 0.10, 0.06, 0.04, 0.03, 0.02]))


@pytest.mark.parametrize("top_p", [0.5, 0.56, 0.9, 0.99])
def test_top_p_stays_in_metas_nucleus_with_renormalised_mass(top_p):
    probs = np.exp(LOGITS)
    nucleus = meta_nucleus(probs[None], top_p)
    got = draws(Sample(temperature=1.0, top_p=top_p), LOGITS)
    assert set(got.tolist()) == nucleus  # never outside, and every member reachable
    idx = sorted(nucleus)
    want = probs[idx] / probs[idx].sum()
    freq = np.bincount(got, minlength=len(probs))[idx] / N
    np.testing.assert_allclose(freq, want, atol=0.03)


def test_top_k_stays_in_top_k():
    got = draws(Sample(temperature=1.0, top_p=1.0, top_k=3), LOGITS)
    assert set(got.tolist()) == {0, 1, 2}
    got = draws(Sample(temperature=5.0, top_p=1.0, top_k=1), LOGITS)
    assert set(got.tolist()) == {0}


def test_temperature_sharpens():
    hot = draws(Sample(temperature=2.0, top_p=1.0), LOGITS)
    cold = draws(Sample(temperature=0.2, top_p=1.0), LOGITS)
    assert (cold == 0).mean() > 0.6 > (hot == 0).mean()


def test_same_seed_same_tokens_and_greedy():
    s = Sample(temperature=1.0, top_p=0.9)
    np.testing.assert_array_equal(draws(s, LOGITS, 7), draws(s, LOGITS, 7))
    assert (draws(s, LOGITS, 7) != draws(s, LOGITS, 8)).any()
    assert set(draws(Greedy(), LOGITS).tolist()) == {0}


def test_make_sampler_defaults_and_errors():
    assert make_sampler(0) == Greedy()
    assert make_sampler() == Sample(0.6, 0.9, None)  # Meta's chat defaults
    with pytest.raises(ValueError, match="top_p"):
        make_sampler(0.6, 1.5)
    with pytest.raises(ValueError, match="temperature"):
        make_sampler(-1)
