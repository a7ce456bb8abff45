"""The continuous-batching engine in-process: slots, per-row sampling, prefix cache, scheduler.

References are independent of the pieces under test: greedy decoding by the model's cache-free
forward pass on each prompt alone, and Meta's top-p masking written in torch.
"""

import queue

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax.model import checkpoint
from llama2_jax.inference.params import GREEDY, SamplingParams
from llama2_jax.inference.buckets import Shapes
from llama2_jax.inference.slots import Slots
from llama2_jax.model.config import TINY
from llama2_jax.model.kv_cache import Blocks, KVCache
from llama2_jax.inference.generate import Engine
from llama2_jax.inference.prefix_cache import PrefixCache
from llama2_jax.inference.requests import (ContextError, Done, PromptLogprobs, QueueFull,
                                           Request, ShuttingDown, Token)
from llama2_jax.inference.scheduler import Scheduler
from tests.conftest import greedy_by_forward

CFG = TINY.replace(n_kv_heads=2, max_seq_len=128)
RNG = np.random.RandomState(0)
PROMPTS = [RNG.randint(3, CFG.vocab_size, n).tolist() for n in (1, 5, 17, 31, 33, 70, 9, 100)]


@pytest.fixture(scope="module")
def model(one_device_mesh):
    return checkpoint.random_model(CFG, one_device_mesh, seed=7)


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model)


def alone(engine, prompt, n=12):
    return greedy_by_forward(engine, prompt, n)


def run_all(scheduler, requests, timeout=120):
    """Submit `requests` (prompt, max_tokens, settings) at once; their tokens and Done."""
    queues, out = [], []
    for prompt, n, settings in requests:
        q = queue.Queue()
        scheduler.submit(Request(prompt, n, sink=q.put, params=settings, stop_ids=frozenset()))
        queues.append(q)
    for q in queues:
        tokens, done = [], None
        while done is None:
            for e in q.get(timeout=timeout):
                if isinstance(e, Token):
                    tokens.append(e.id)
                else:
                    done = e
        out.append((tokens, done))
    return out


def scheduler_for(engine, slots=3, length=128, chunk=16, prefix=1 << 20, **kw):
    return Scheduler(lambda: Slots(engine.weights, slots, length, chunk=chunk, kv_block=32),
                     length=length,
                     vocab_size=CFG.vocab_size, prefix_cache_bytes=prefix, **kw).start()


# -- slots -----------------------------------------------------------------------------------
@pytest.mark.parametrize("unstack", [True, False], ids=["unstacked", "scan"])
def test_slots_chunked_prefill_and_decode_equal_generate_alone(model, unstack):
    engine = Engine(model, unstack=unstack)
    slots = Slots(engine.weights, 4, 128, chunk=16, kv_block=16)
    prompts = PROMPTS[1:5]
    got = [[] for _ in prompts]
    for s, p in enumerate(prompts):
        for start in range(0, len(p), 16):
            out = slots.prefill(s, p[start:start + 16], start, start + 16 >= len(p), GREEDY)
        got[s].append(int(out.tokens[0]))
    for _ in range(11):
        out = slots.decode()
        for s in range(len(prompts)):
            got[s].append(int(out.tokens[s]))
    assert got == [alone(engine, p) for p in prompts]


def test_decode_attends_over_the_blocks_of_the_tokens_in_use(engine):
    slots = Slots(engine.weights, 2, 128, chunk=32, kv_block=16)
    assert slots.shapes.blocks == (16,) * 8 and slots.shapes.attend_buckets() == [16, 32, 64, 128]
    slots.prefill(0, PROMPTS[2], 0, True, GREEDY)  # 17 tokens
    before = slots.compile_count
    slots.decode()
    slots.decode()
    assert slots.compile_count == before + 1  # one decode compile for the 32-position bucket
    slots.prefill(1, PROMPTS[5][:32], 0, True, GREEDY)  # the first prefill's shape
    slots.decode()  # 32 + 1 positions in use: the next bucket (and two rows)
    assert slots.compile_count == before + 2


def _cache_slices(hlo: str, cache) -> list[str]:
    shapes = {"x".join(map(str, shape)) for x in jax.tree.leaves(cache)
              for shape in (x.shape, x.shape[1:])}  # [L, B, K, S, H], or one layer's
    return [line for line in hlo.splitlines() if "stablehlo.slice" in line
            and any(f"tensor<{shape}x" in line.split("->")[0] for shape in shapes)]


def test_decode_step_reads_whole_cache_arrays_only(engine):
    """No slice of a cache array is taken by a decode step: the rows and positions it reads
    are whole row groups and position blocks (XLA:CPU would copy a slice)."""
    slots = Slots(engine.weights, 8, 128, chunk=32, kv_block=16)
    assert slots.shapes.groups == (1, 3, 4) and slots.shapes.row_buckets() == [1, 4, 8]
    active = np.ones(8, bool)
    with jax.set_mesh(engine.mesh):
        hlo = slots._decode.lower(engine.weights.leaves, None, slots.cache, slots.state,
                                  active, slots._decode_mask(None), None, rows=4,
                                  attend=32).as_text()
        assert not _cache_slices(hlo, slots.cache)
        # the check sees slices where there are: one [8 rows, 128 positions] array per layer
        shape = (8, CFG.n_kv_heads, 128, CFG.head_dim)
        plain = tuple(Blocks(((KVCache(jnp.zeros(shape), jnp.zeros(shape)),),))
                      for _ in range(CFG.n_layers))
        model, unstacked = engine.weights.model(engine.weights.leaves)
        step = jax.jit(lambda c: model(jnp.zeros((4, 1), jnp.int32),
                                       jnp.zeros((4, 1), jnp.int32), c, attend=32,
                                       unstacked=unstacked)[1])
        assert _cache_slices(step.lower(plain).as_text(), plain)


def test_decode_computes_only_the_rows_up_to_the_highest_slot_in_use(engine):
    slots = Slots(engine.weights, 8, 128, chunk=32, kv_block=16, row_growth=2)
    assert slots.shapes.groups == (1, 1, 2, 4) and slots.shapes.row_buckets() == [1, 2, 4, 8]
    p, q = PROMPTS[2], PROMPTS[3]
    first = slots.prefill(0, p, 0, True, GREEDY)
    got_p = [int(first.tokens[0])]
    out = slots.decode()
    assert out.tokens.shape == (1,)  # one row computed, not eight
    got_p.append(int(out.tokens[0]))
    first = slots.prefill(5, q, 0, True, GREEDY)  # slot 5 in use: rows 0..7
    got_q = [int(first.tokens[0])]
    for _ in range(6):
        out = slots.decode()
        assert out.tokens.shape == (8,)
        got_p.append(int(out.tokens[0]))
        got_q.append(int(out.tokens[5]))
    slots.release(5)  # back to one row: slot 0's state was kept through both shapes
    for _ in range(2):
        out = slots.decode()
        assert out.tokens.shape == (1,)
        got_p.append(int(out.tokens[0]))
    assert got_p == alone(engine, p, 10) and got_q == alone(engine, q, 7)


def test_decode_shape_is_the_highest_slot_and_the_longest_position_in_use():
    shapes = Shapes.make(8, 128, chunk=32, kv_block=16, row_growth=2)  # rows 1, 2, 4, 8
    idle = np.full(8, 128)
    assert shapes.decode_shape(idle) == (1, 16)
    at = idle.copy()
    at[0], at[5] = 40, 3  # slot 5 in use: all 8 rows; position 40 needs 41 of them: 64
    assert shapes.decode_shape(at) == (8, 64)
    at[5] = 128
    at[1] = 15  # slots 0-1: 2 rows; position 40 still the longest
    assert shapes.decode_shape(at) == (2, 64)
    at[0] = 128
    assert shapes.decode_shape(at) == (2, 16)  # slot 1 alone at 15: 16 positions


def test_decode_steps_between_chunks_leave_a_prompt_being_prefilled_intact(engine):
    slots = Slots(engine.weights, 4, 128, chunk=16, kv_block=16)
    p, q = PROMPTS[4], PROMPTS[3]  # 33 and 31 tokens
    got_q = [int(slots.prefill(1, q[:16], 0, False, GREEDY).tokens[0])]
    got_q = [int(slots.prefill(1, q[16:], 16, True, GREEDY).tokens[0])]
    slots.prefill(2, p[:16], 0, False, GREEDY)
    for _ in range(3):  # slot 1 decodes (rows 0..1); slot 2, mid-prefill, is outside them
        got_q.append(int(slots.decode().tokens[1]))
    slots.prefill(2, p[16:32], 16, False, GREEDY)
    for _ in range(2):  # now rows 0..3, slot 2 among them, idle
        got_q.append(int(slots.decode().tokens[1]))
    got_p = [int(slots.prefill(2, p[32:], 32, True, GREEDY).tokens[0])]
    for _ in range(6):
        out = slots.decode()
        got_p.append(int(out.tokens[2]))
        got_q.append(int(out.tokens[1]))
    assert got_p == alone(engine, p, 7) and got_q == alone(engine, q, 12)


def test_chunks_out_of_order_are_refused(engine):
    slots = Slots(engine.weights, 2, 128, chunk=16, kv_block=16)
    p = PROMPTS[4]
    slots.prefill(0, p[:16], 0, False, GREEDY)
    with pytest.raises(ValueError, match="no prompt prefilled up to position 16"):
        slots.prefill(1, p[16:32], 16, False, GREEDY)  # another slot's continuation
    with pytest.raises(ValueError, match="in order"):
        slots.prefill(0, p[20:32], 20, False, GREEDY)  # a gap
    slots.prefill(0, p[16:32], 16, False, GREEDY)  # the right continuation


def test_prefix_extract_and_insert_reuse_keys_and_values(engine):
    slots = Slots(engine.weights, 2, 128, chunk=128, kv_block=16)
    p = PROMPTS[5]  # 70 tokens
    slots.prefill(0, p, 0, True, GREEDY)
    prefix = slots.extract(0, 60)
    assert prefix.length == 60 and prefix.nbytes == slots.prefix_bytes(60)
    slots.insert(1, prefix)
    out = slots.prefill(1, p[60:], 60, True, GREEDY)
    got = [int(out.tokens[1 - 1])] + [int(slots.decode().tokens[1]) for _ in range(7)]
    assert got == alone(engine, p, 8)


def test_warm_up_compiles_every_shape(engine):
    slots = Slots(engine.weights, 3, 64, chunk=32, kv_block=16)
    compiled = slots.warm_up()
    assert compiled == slots.compile_count == slots.shapes.compiled_steps()  # the planner's count
    for p in PROMPTS[:6]:  # any prompt, chunk and decode length: nothing new
        p = p[:60]
        for start in range(0, len(p), 32):
            slots.prefill(2, p[start:start + 32], start, start + 32 >= len(p),
                          SamplingParams(0.7, 1.0))
        for _ in range(3):
            slots.decode()
    slots.insert(0, slots.extract(2, 40))
    assert slots.compile_count == compiled
    scored = slots.warm_up(score=True)  # the echo prefills: one per prefill shape more
    assert compiled + scored == slots.shapes.compiled_steps(score=True)
    slots.prefill_scored(1, PROMPTS[3][:32], 0, False, GREEDY, 5)
    assert slots.compile_count == compiled + scored


# -- prefix cache bookkeeping ------------------------------------------------------------------
def test_prefix_cache_longest_match_supersede_and_lru_budget():
    cache = PrefixCache(budget_bytes=300, min_tokens=4)
    a = list(range(10, 30))
    assert cache.wants(a, 100)
    cache.store(a, "A", 100)
    assert cache.lookup(a[:12] + [99, 98], limit=13) == (12, "A")  # up to the first difference
    assert cache.lookup([1, 2, 3, 4, 5], limit=4) == (0, None)
    assert not cache.wants(a[:15], 100)  # covered by A
    dropped = cache.store(a + [7, 7], "A2", 100)  # A is a prefix of it: superseded
    assert dropped == ["A"] and len(cache) == 1
    cache.store(list(range(50, 70)), "B", 100)
    cache.store(list(range(80, 90)), "C", 100)
    cache.lookup(a, limit=20)  # A2 becomes the most recently used
    dropped = cache.store(list(range(200, 220)), "D", 100)
    assert dropped == ["B"] and cache.nbytes == 300  # least recently used goes first
    assert cache.store(list(range(300, 340)), "E", 400) == ["E"]  # over the whole budget
    assert cache.nbytes <= cache.budget


# -- the scheduler ---------------------------------------------------------------------------
def test_scheduler_joins_and_leaves_with_greedy_and_sampled_rows(engine):
    sched = scheduler_for(engine, slots=3)
    try:
        sched.ready.wait(60)
        sampled = SamplingParams(temperature=0.9, top_p=0.9, seed=11)
        requests = [(p, 6 + i % 5, sampled if i % 3 == 1 else GREEDY)
                    for i, p in enumerate(PROMPTS)]  # 8 requests through 3 slots
        batched = run_all(sched, requests)
        for (prompt, n, s), (tokens, done) in zip(requests, batched):
            assert done.reason == "length" and len(tokens) == n
            if s.temperature == 0:
                assert tokens == alone(engine, prompt, n)
        # a sampled request alone draws what it drew beside the others
        for (prompt, n, s), (tokens, _) in zip(requests, batched):
            if s.temperature:
                assert run_all(sched, [(prompt, n, s)])[0][0] == tokens
        assert sched.active_slots == 0 and sched.queue_depth == 0
    finally:
        sched.shutdown(0)
        assert sched.join(30)


def test_scheduler_prefix_hits_give_the_tokens_of_misses(engine):
    sched = scheduler_for(engine, slots=2, chunk=16)
    try:
        sched.ready.wait(60)
        p = PROMPTS[5]  # 70 tokens
        [(first, miss)] = run_all(sched, [(p, 8, GREEDY)])
        [(again, hit)] = run_all(sched, [(p, 8, GREEDY)])
        assert miss.cached_tokens == 0 and hit.cached_tokens == len(p) - 1 and again == first
        turn2 = p + first + PROMPTS[3]  # a conversation resent with its answer (109 tokens)
        [(tokens, done)] = run_all(sched, [(turn2, 8, GREEDY)])
        assert done.cached_tokens >= len(p) and tokens == alone(engine, turn2, 8)
    finally:
        sched.shutdown(0)
        sched.join(30)


def test_scored_prompts_give_forward_logprobs_over_chunks_and_prefix_hits(engine):
    """echo's prompt log-probabilities: each prompt token's under the cache-free forward pass,
    for prompts over several chunks, prompts the prefix cache holds, and max_tokens 0."""
    sched = scheduler_for(engine, slots=2, chunk=16)
    try:
        sched.ready.wait(60)
        p = PROMPTS[5]  # 70 tokens: 5 chunks of 16
        run_all(sched, [(p, 4, GREEDY)])  # now in the prefix cache
        for prompt, max_tokens in ((p, 0), (p, 3), (PROMPTS[2], 1), (PROMPTS[0], 0)):
            q = queue.Queue()
            sched.submit(Request(prompt, max_tokens, sink=q.put, params=GREEDY,
                                 stop_ids=frozenset(), score_prompt=True))
            events = []
            while not events or not isinstance(events[-1], Done):
                events += q.get(timeout=120)
            scores = [e for e in events if isinstance(e, PromptLogprobs)]
            tokens = [e for e in events if isinstance(e, Token)]
            assert events[-1].cached_tokens == 0 and len(tokens) == max_tokens
            assert all(isinstance(e, PromptLogprobs) for e in events[:len(scores)])
            logits = engine.forward(prompt)
            want = jax.nn.log_softmax(logits, axis=-1)
            got = [lp for e in scores for lp in e.logprobs]
            assert [e.start for e in scores] == list(range(0, len(prompt) - 1, 16))
            np.testing.assert_allclose(got, want[np.arange(len(prompt) - 1), prompt[1:]],
                                       atol=1e-5, rtol=0)
            top = [alts for e in scores for alts in e.top]
            for t, alts in enumerate(top):
                ids, lps = zip(*alts)
                np.testing.assert_allclose(lps, np.sort(want[t])[::-1][:len(lps)], atol=1e-5)
                assert ids[0] == int(np.argmax(logits[t]))
            if tokens:  # the answer starts where generate's would
                assert [t.id for t in tokens] == alone(engine, prompt, max_tokens)
    finally:
        sched.shutdown(0)
        sched.join(30)


def test_scheduler_bounded_queue_cancel_and_shutdown(engine):
    sched = scheduler_for(engine, slots=1, max_queue=2)
    try:
        sched.ready.wait(60)
        with pytest.raises(ContextError, match="120 tokens and max_tokens is 20: 140 tokens, "
                           "over the context of 128"):
            sched.submit(Request([5] * 120, 20, sink=lambda e: None))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            sched.submit(Request([5, CFG.vocab_size], 2, sink=lambda e: None))
        events = [queue.Queue() for _ in range(3)]
        never = frozenset()  # no stop token: the reasons below are the scheduler's
        running = Request(PROMPTS[3], 90, sink=events[0].put, stop_ids=never)
        sched.submit(running)
        assert isinstance(events[0].get(timeout=60)[0], Token)  # it holds the one slot
        waiting = [Request(PROMPTS[1], 5, sink=q.put, stop_ids=never) for q in events[1:]]
        for r in waiting:
            sched.submit(r)
        with pytest.raises(QueueFull):
            sched.submit(Request(PROMPTS[1], 5, sink=lambda e: None))
        sched.cancel(waiting[0])
        sched.cancel(running)
        done = drain(events[0])
        assert done.reason == "cancelled" and done.completion_tokens < 90
        assert drain(events[1]).reason == "cancelled"
        assert drain(events[2]).reason == "length"
        long = Request(PROMPTS[3], 90, sink=events[0].put, stop_ids=never)
        sched.submit(long)
        events[0].get(timeout=60)
        sched.shutdown(grace=60)
        with pytest.raises(ShuttingDown):
            sched.submit(Request(PROMPTS[1], 5, sink=lambda e: None))
        assert drain(events[0]).reason == "length"  # the running request finished
        assert sched.join(30)
    finally:
        sched.shutdown(0)


def drain(q) -> Done:
    while True:
        for e in q.get(timeout=60):
            if isinstance(e, Done):
                return e
