"""The offline doors (generate, stream, Session) over the one stepper: stop conditions, compile
counts, seeds, and a conversation that keeps its slot. References: the cache-free forward."""

import numpy as np
import pytest

import llama2_jax
from llama2_jax.inference.generate import ContextError, Engine, Session
from llama2_jax.inference.params import GREEDY, SamplingParams
from llama2_jax.model import checkpoint
from llama2_jax.model.config import TINY
from tests.conftest import greedy_by_forward

CFG = TINY.replace(n_kv_heads=2, max_seq_len=64)


@pytest.fixture(scope="module")
def model(one_device_mesh):
    return checkpoint.random_model(CFG, one_device_mesh, seed=11)


@pytest.fixture(scope="module", params=[True, False], ids=["unstacked", "scan"])
def engine(model, request):
    """Both layer paths: per-layer weights in a loop (CPU default) and the stacked scan."""
    return Engine(model, unstack=request.param)


def prompt(n, seed=0):
    return np.random.RandomState(seed).randint(3, CFG.vocab_size, n).tolist()


def test_generate_equals_the_cache_free_forward_on_both_layer_paths(engine):
    prompts = [prompt(4, 13), prompt(19, 14), prompt(9, 15)]
    together = engine.generate(prompts, max_new_tokens=10, params=GREEDY)
    assert together == [greedy_by_forward(engine, p, 10) for p in prompts]
    # one row alone, or a batch larger than the slots (it queues): the same tokens
    assert engine.generate(prompts[1:2], max_new_tokens=10, params=GREEDY) == together[1:2]


def test_a_batch_larger_than_the_slots_queues(model):
    engine = Engine(model, max_batch=2)
    prompts = [prompt(5 + i, 20 + i) for i in range(5)]
    sampled = SamplingParams(0.9, 0.9, 0, seed=4)
    got = engine.generate(prompts, max_new_tokens=6, params=sampled)
    # row b draws with seed + b, whatever else is batched with it
    for b, p in enumerate(prompts):
        alone = engine.generate([p], max_new_tokens=6,
                                params=SamplingParams(0.9, 0.9, 0, seed=4 + b))[0]
        assert got[b] == alone


def test_prompt_lengths_in_one_bucket_compile_once(model):
    engine = Engine(model)
    engine.generate([prompt(3)], max_new_tokens=5, params=GREEDY)
    first = engine.compile_count
    assert first == 2  # one prefill, one decode step (one slot: no commit)
    for n in (1, 9, 16):
        engine.generate([prompt(n, n)], max_new_tokens=5, params=GREEDY)
    assert engine.compile_count == first
    engine.generate([prompt(17)], max_new_tokens=5, params=GREEDY)  # next prefill bucket
    assert engine.compile_count == first + 1


def test_stop_per_sequence(engine):
    prompts = [prompt(5, 1), prompt(12, 2)]
    free = engine.generate(prompts, max_new_tokens=20, params=GREEDY)
    assert [len(o) for o in free] == [20, 20]
    stop = free[0][3]
    stopped = engine.generate(prompts, max_new_tokens=20, params=GREEDY, stop_ids=[stop])
    for full, out in zip(free, stopped):
        cut = full.index(stop) if stop in full else len(full)
        assert out == full[:cut]  # the stop token itself is not returned
    assert len(stopped[0]) <= 3


def test_context_limit(engine):
    out = engine.generate([prompt(60), prompt(10)], max_new_tokens=20, params=GREEDY)
    assert [len(o) for o in out] == [4, 20]  # prompt + answer never exceed max_seq_len=64
    assert engine.generate([prompt(64)], max_new_tokens=5, params=GREEDY) == [[]]
    with pytest.raises(ContextError, match="65 tokens exceeds the context of 64"):
        engine.generate([prompt(65)], max_new_tokens=5, params=GREEDY)


def test_seeded_sampling_is_reproducible(model):
    a = llama2_jax.generate(model, [prompt(7)], max_new_tokens=12, seed=3, stop_ids=[])
    b = llama2_jax.generate(model, [prompt(7)], max_new_tokens=12, seed=3, stop_ids=[])
    c = llama2_jax.generate(model, [prompt(7)], max_new_tokens=12, seed=4, stop_ids=[])
    assert a == b != c


def test_session_keeps_its_slot_across_turns(engine):
    session = Session(engine, length=64)
    turn1 = prompt(10, 5)
    answer1 = list(session.generate(turn1, max_new_tokens=6, params=GREEDY))
    assert answer1 == greedy_by_forward(engine, turn1, 6)
    assert session.cached == turn1 + answer1[:-1] and session.reused == 0
    turn2 = turn1 + answer1 + prompt(7, 6)
    answer2 = list(session.generate(turn2, max_new_tokens=6, params=GREEDY))
    assert session.reused == len(turn1) + len(answer1) - 1  # only the new tokens prefilled
    assert answer2 == greedy_by_forward(engine, turn2, 6)
    # a prompt that diverges early re-uses only the common prefix
    turn3 = turn1[:4] + prompt(9, 7)
    answer3 = list(session.generate(turn3, max_new_tokens=6, params=GREEDY))
    assert session.reused == 4 and answer3 == greedy_by_forward(engine, turn3, 6)
    compiled = session.compile_count
    for t in range(4):  # more turns of the same sizes compile nothing
        turn = turn3 + answer3 + prompt(3, 30 + t)
        list(session.generate(turn, max_new_tokens=4, params=GREEDY))
    assert session.compile_count == compiled


def test_session_turns_sampled_equal_generate(model):
    engine = Engine(model)
    session = Session(engine, length=64)
    params = SamplingParams(0.8, 0.9, 0, seed=9)
    turn = prompt(8, 40)
    for t in range(3):
        answer = list(session.generate(turn, max_new_tokens=5, params=params))
        assert answer == engine.generate([turn], max_new_tokens=5, params=params)[0]
        turn = turn + answer + prompt(4, 41 + t)


def test_session_survives_interrupted_answer(engine):
    session = Session(engine, length=64)
    stream = session.generate(prompt(10, 8), max_new_tokens=10,
                              params=SamplingParams(0.8, 1.0))
    next(stream), next(stream)
    stream.close()  # what Ctrl-C in the chat app amounts to
    turn = prompt(10, 8) + prompt(5, 9)
    assert list(session.generate(turn, max_new_tokens=5, params=GREEDY)) == \
        greedy_by_forward(engine, turn, 5)
    with pytest.raises(ContextError, match="no room"):
        next(session.generate(prompt(64), max_new_tokens=5))


def test_stream_text_matches_generate(tokenizer, one_device_mesh):
    model = checkpoint.random_model(TINY.replace(vocab_size=32000), one_device_mesh, seed=2)
    ids = llama2_jax.encode_dialog(tokenizer, [{"role": "user", "content": "Hi 🦙"}])
    pieces = list(llama2_jax.stream_text(model, tokenizer, ids, max_new_tokens=24,
                                         temperature=0))
    [tokens] = llama2_jax.generate(model, [ids], max_new_tokens=24, temperature=0)
    assert len(pieces) > 1 and "".join(pieces) == tokenizer.decode(tokens)
