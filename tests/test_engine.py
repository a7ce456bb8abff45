"""Stop conditions, compile counts, sampling determinism and multi-turn cache reuse."""

import numpy as np
import pytest

import llama2_jax
from llama2_jax.model import checkpoint
from llama2_jax.model.config import TINY
from llama2_jax.inference.generate import ContextError, Engine, EngineOptions, Session, bucket, cache_length
from llama2_jax.model.transformer import KVCache
from llama2_jax.inference.sampling import Greedy, Sample

CFG = TINY.replace(n_kv_heads=2, max_seq_len=64)


@pytest.fixture(scope="module")
def model(one_device_mesh):
    return checkpoint.random_model(CFG, one_device_mesh, seed=11)


@pytest.fixture(scope="module", params=[True, False], ids=["unstacked", "scan"])
def engine(model, request):
    """Both layer paths: per-layer weights in a loop (CPU default) and the stacked scan."""
    return Engine(model, unstack=request.param)


def test_unstacked_and_scanned_layers_agree(model):
    loop, scan = Engine(model, unstack=True), Engine(model, unstack=False)
    caches = loop.new_cache(1, 16)  # a tuple of one-layer caches, without size-1 dimensions
    assert [c.k.shape for c in caches] == [(CFG.n_kv_heads, 16, CFG.head_dim)] * 2
    assert loop.new_cache(3, 16)[0].k.shape == (3, CFG.n_kv_heads, 16, CFG.head_dim)
    assert scan.new_cache(1, 16).k.shape == (CFG.n_layers, 1, CFG.n_kv_heads, 16, CFG.head_dim)
    tokens = prompt(21, 12)
    np.testing.assert_allclose(loop.forward(tokens), scan.forward(tokens), atol=1e-5, rtol=0)
    prompts = [prompt(4, 13), prompt(19, 14)]
    assert loop.generate(prompts, max_new_tokens=10, sampler=Greedy()) == \
        scan.generate(prompts, max_new_tokens=10, sampler=Greedy())


def prompt(n, seed=0):
    return np.random.RandomState(seed).randint(3, CFG.vocab_size, n).tolist()


def test_prompt_lengths_in_one_bucket_compile_once(model):
    engine = Engine(model)
    engine.generate([prompt(3)], max_new_tokens=5, sampler=Greedy())
    assert engine.compile_count == 2  # one prefill, one decode step
    for n in (1, 9, 16):
        engine.generate([prompt(n, n)], max_new_tokens=5, sampler=Greedy())
    assert engine.compile_count == 2
    engine.generate([prompt(17)], max_new_tokens=5, sampler=Greedy())  # next bucket
    assert engine.compile_count == 4
    assert [bucket(n, 64) for n in (1, 16, 17, 33, 100)] == [16, 16, 32, 64, 64]


def test_stop_per_sequence(engine):
    prompts = [prompt(5, 1), prompt(12, 2)]
    free = engine.generate(prompts, max_new_tokens=20, sampler=Greedy())
    assert [len(o) for o in free] == [20, 20]
    stop = free[0][3]
    stopped = engine.generate(prompts, max_new_tokens=20, sampler=Greedy(), stop_ids=[stop])
    for full, out in zip(free, stopped):
        cut = full.index(stop) if stop in full else len(full)
        assert out == full[:cut]  # the stop token itself is not returned
    assert len(stopped[0]) <= 3


def test_context_limit(engine):
    out = engine.generate([prompt(60), prompt(10)], max_new_tokens=20, sampler=Greedy())
    assert [len(o) for o in out] == [4, 20]  # prompt + answer never exceed max_seq_len=64
    assert engine.generate([prompt(64)], max_new_tokens=5, sampler=Greedy()) == [[]]
    with pytest.raises(ContextError, match="65 tokens exceeds the context of 64"):
        engine.generate([prompt(65)], max_new_tokens=5, sampler=Greedy())


def test_seeded_sampling_is_reproducible(model):
    a = llama2_jax.generate(model, [prompt(7)], max_new_tokens=12, seed=3, stop_ids=[])
    b = llama2_jax.generate(model, [prompt(7)], max_new_tokens=12, seed=3, stop_ids=[])
    c = llama2_jax.generate(model, [prompt(7)], max_new_tokens=12, seed=4, stop_ids=[])
    assert a == b != c


def test_session_reuses_cache_across_turns(engine, model):
    # The unstacked engine's cache starts per layer and turns stacked when it grows past 16.
    engine = Engine(model, unstack=engine._unstacked is not None,
                    options=EngineOptions(unstack_max_slots=16, session_min_cache=16))
    session = Session(engine, length=64)
    turn1 = prompt(10, 5)
    answer1 = list(session.generate(turn1, max_new_tokens=6, sampler=Greedy()))
    assert answer1 == engine.generate([turn1], max_new_tokens=6, sampler=Greedy())[0]
    assert session.cached == turn1 + answer1[:-1]
    assert cache_length(session.cache) == 16  # sized by need, not by the 64-token context
    assert isinstance(session.cache, KVCache) == (engine._unstacked is None)
    turn2 = turn1 + answer1 + prompt(7, 6)
    answer2 = list(session.generate(turn2, max_new_tokens=6, sampler=Greedy()))
    assert cache_length(session.cache) == 32  # grown, keeping what it held
    assert isinstance(session.cache, KVCache)  # stacked past unstack_max_slots
    assert answer2 == engine.generate([turn2], max_new_tokens=6, sampler=Greedy())[0]
    # a prompt that diverges early re-uses only the common prefix
    turn3 = turn1[:4] + prompt(9, 7)
    answer3 = list(session.generate(turn3, max_new_tokens=6, sampler=Greedy()))
    assert answer3 == engine.generate([turn3], max_new_tokens=6, sampler=Greedy())[0]


def test_session_survives_interrupted_answer(engine):
    session = Session(engine, length=64)
    stream = session.generate(prompt(10, 8), max_new_tokens=10, sampler=Sample(0.8))
    next(stream), next(stream)
    stream.close()  # what Ctrl-C in the chat app amounts to
    turn = prompt(10, 8) + prompt(5, 9)
    assert list(session.generate(turn, max_new_tokens=5, sampler=Greedy())) == \
        engine.generate([turn], max_new_tokens=5, sampler=Greedy())[0]
    with pytest.raises(ContextError, match="no room"):
        next(session.generate(prompt(64), max_new_tokens=5))


def test_stream_text_matches_generate(tokenizer, one_device_mesh):
    from llama2_jax.model.config import TINY as T
    model = checkpoint.random_model(T.replace(vocab_size=32000), one_device_mesh, seed=2)
    ids = llama2_jax.encode_dialog(tokenizer, [{"role": "user", "content": "Hi 🦙"}])
    pieces = list(llama2_jax.stream_text(model, tokenizer, ids, max_new_tokens=24,
                                         temperature=0))
    [tokens] = llama2_jax.generate(model, [ids], max_new_tokens=24, temperature=0)
    assert len(pieces) > 1 and "".join(pieces) == tokenizer.decode(tokens)
