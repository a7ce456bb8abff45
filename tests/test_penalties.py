"""Penalties, biases, min_p and min_tokens against Hugging Face transformers' logits processors
(PyTorch) on the same logits, and through the slots against a forward-pass reference.

OpenAI's presence and frequency penalties have no HF processor: their reference is OpenAI's
published formula, written here in numpy.
"""

import queue

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as hf

from llama2_jax.inference import penalties
from llama2_jax.inference.generate import Engine
from llama2_jax.inference.params import GREEDY, SamplingParams
from llama2_jax.inference.requests import Done, Request, Token
from llama2_jax.inference.sampling import RowSampling, sample_rows
from llama2_jax.inference.scheduler import Scheduler
from llama2_jax.inference.slots import Slots
from llama2_jax.model import checkpoint
from llama2_jax.model.config import TINY
from tests.conftest import penalized_greedy

V = 64
RNG = np.random.RandomState(3)


def rows_of(settings, answers, vocab=V):
    """RowPenalties of requests (SamplingParams) whose answers so far are `answers`."""
    rows = [penalties.of(s, vocab) for s in settings]
    p = jax.tree.map(lambda *x: np.concatenate(x), *rows)
    for b, answer in enumerate(answers):
        for t in answer:
            p.counts[b, t] += 1
            p.seen[b, t] |= bool(p.on[b])
    return p


def test_each_penalty_equals_its_reference_on_the_same_logits():
    logits = RNG.randn(5, V).astype(np.float32) * 3
    prompt = [[1, 5, 9, 5], [2, 3], [7], [4, 4, 8], [10]]
    answer = [[5, 11, 11, 12], [3, 3, 6], [8, 9], [], [13, 13, 13]]
    settings = [
        SamplingParams(repetition_penalty=1.7, prompt_tokens=prompt[0]),
        SamplingParams(repetition_penalty=0.8, prompt_tokens=prompt[1]),
        SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4),
        SamplingParams(logit_bias=((3, 100.0), (4, -100.0), (0, 2.5))),
        SamplingParams(min_tokens=5, banned=(2, 13))]
    p = rows_of(settings, answer)
    got = np.asarray(penalties.apply(jnp.asarray(logits), p, jnp.asarray(p.on),
                                     jnp.asarray([len(a) for a in answer])))

    def torch_rows(b):
        return torch.tensor(logits[b:b + 1])

    for b, r in ((0, 1.7), (1, 0.8)):  # CTRL / HF: over prompt and answer
        ids = torch.tensor([prompt[b] + answer[b]])
        want = hf.RepetitionPenaltyLogitsProcessor(r)(ids, torch_rows(b)).numpy()[0]
        np.testing.assert_allclose(got[b], want, rtol=1e-6)
    counts = np.bincount(answer[2], minlength=V)  # OpenAI's formula, over the answer
    want = logits[2] - counts * -0.4 - (counts > 0) * 0.7
    np.testing.assert_allclose(got[2], want, rtol=1e-6)
    ids = torch.tensor([prompt[3]])
    bias = [[[3], 100.0], [[4], -100.0], [[0], 2.5]]
    want = hf.SequenceBiasLogitsProcessor(bias)(ids, torch_rows(3)).numpy()[0]
    np.testing.assert_allclose(got[3], want, rtol=1e-6)
    ids = torch.tensor([prompt[4] + answer[4]])
    want = hf.MinNewTokensLengthLogitsProcessor(len(prompt[4]), 5, [2, 13])(
        ids, torch_rows(4)).numpy()[0]
    np.testing.assert_array_equal(got[4], want)
    # no row asked: the logits as they were, untouched
    plain = penalties.apply(jnp.asarray(logits), p, jnp.zeros(5, bool), jnp.zeros(5, jnp.int32))
    np.testing.assert_array_equal(np.asarray(plain), logits)


@pytest.mark.parametrize("min_p,temperature", [(0.05, 1.0), (0.3, 0.7), (0.9, 1.3)])
def test_min_p_draws_only_what_hf_min_p_keeps(min_p, temperature):
    logits = (RNG.randn(1, V) * 2).astype(np.float32)
    scaled = torch.tensor(logits / temperature)
    kept = np.isfinite(hf.MinPLogitsWarper(min_p)(None, scaled).numpy()[0])
    n = 400
    keys = jnp.asarray(np.stack([np.zeros(n), np.arange(n)], 1), jnp.uint32)  # n seeds
    s = RowSampling(jnp.full(n, temperature, jnp.float32), jnp.ones(n, jnp.float32),
                    jnp.zeros(n, jnp.int32), keys, jnp.zeros(n, jnp.int32),
                    jnp.full(n, min_p, jnp.float32))
    drawn = np.asarray(sample_rows(jnp.asarray(np.repeat(logits, n, 0)), s))
    assert set(drawn) <= set(np.flatnonzero(kept))
    if kept.sum() <= 6:  # each kept token shows up
        assert set(drawn) == set(np.flatnonzero(kept))


# -- through the slots and the scheduler --------------------------------------------------------
CFG = TINY.replace(max_seq_len=128)


@pytest.fixture(scope="module")
def engine(one_device_mesh):
    return Engine(checkpoint.random_model(CFG, one_device_mesh, seed=11))


def test_penalized_rows_beside_plain_ones_equal_the_reference(engine):
    sched = Scheduler(lambda: Slots(engine.weights, 3, 128, chunk=16, kv_block=32),
                      length=128, vocab_size=CFG.vocab_size).start()
    prompts = [RNG.randint(3, CFG.vocab_size, n).tolist() for n in (7, 20, 12, 5)]
    settings = [
        SamplingParams(temperature=0, top_p=1, repetition_penalty=1.5,
                         frequency_penalty=0.6, presence_penalty=0.4,
                         prompt_tokens=tuple(prompts[0])),
        GREEDY,
        SamplingParams(temperature=0, top_p=1, logit_bias=((7, 5.0), (9, -100.0)),
                       min_tokens=6, banned=(2,)),
        GREEDY]
    try:
        assert sched.ready.wait(120)
        queues = []
        for prompt, s in zip(prompts, settings):
            q = queue.Queue()
            sched.submit(Request(prompt, 10, sink=q.put, params=s, stop_ids=frozenset()))
            queues.append(q)
        for prompt, s, q in zip(prompts, settings, queues):
            events = []
            while not events or not isinstance(events[-1], Done):
                events += q.get(timeout=120)
            got = [e.id for e in events if isinstance(e, Token)]
            assert got == penalized_greedy(engine.forward, prompt, 10, s), s
    finally:
        sched.shutdown(0)
        sched.join(30)
