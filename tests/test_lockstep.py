"""llama2_jax.inference.lockstep in one process: process 0's Slots calls replayed by a follower
thread on Slots of its own, through an in-memory key-value store that behaves as JAX's coordination
service's (the multi-process server itself is tested in tests/test_multihost.py)."""

import queue
import threading

import jax
import numpy as np
import pytest

from llama2_jax.inference import lockstep
from llama2_jax.inference.params import GREEDY
from llama2_jax.inference.slots import Slots
from llama2_jax.inference.requests import Request, Token
from llama2_jax.inference.scheduler import Scheduler
from tests.test_batching import CFG, PROMPTS, alone, engine, model  # noqa: F401 (fixtures)


class Store:
    """The coordination service's key-value store: set (refusing to overwrite unless asked),
    try_get, blocking get with a timeout, delete of a key and the keys under it."""

    def __init__(self):
        self.data: dict[str, str] = {}
        self.cond = threading.Condition()
        self.log: list[str] = []  # every op sent

    def sent(self, op: str) -> int:
        return sum(f'"op": "{op}"' in text for text in self.log)

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.cond:
            if key in self.data and not allow_overwrite:
                raise RuntimeError(f"ALREADY_EXISTS: {key}")
            self.data[key] = value
            self.log.append(value)
            self.cond.notify_all()

    def key_value_try_get(self, key):
        with self.cond:
            if key not in self.data:
                raise RuntimeError(f"NOT_FOUND: {key}")
            return self.data[key]

    def blocking_key_value_get(self, key, timeout_ms):
        with self.cond:
            if not self.cond.wait_for(lambda: key in self.data, timeout_ms / 1000):
                raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}")
            return self.data[key]

    def key_value_delete(self, key):
        with self.cond:
            for k in [k for k in self.data if k == key or k.startswith(key + "/")]:
                del self.data[k]

    def ops(self) -> int:
        return sum("/ops/" in k for k in self.data)


def pair(store):
    return (lockstep.Channel(client=store, processes=2, process=0),
            lockstep.Channel(client=store, processes=2, process=1))


def test_messages_arrive_in_order_and_only_read_ones_are_deleted():
    store = Store()
    leader, follower = pair(store)
    n = 5 * lockstep.BLOCK + 7
    for i in range(n):  # the follower has read nothing: everything is kept
        leader.send({"op": "decode", "i": i})
    assert store.ops() == n
    got = []
    reader = threading.Thread(target=lambda: got.extend(follower.receive()["i"]
                                                        for _ in range(n + lockstep.BLOCK)))
    reader.start()
    for i in range(n, n + lockstep.BLOCK):
        leader.send({"op": "decode", "i": i})
    reader.join(30)
    assert got == list(range(n + lockstep.BLOCK))
    for i in range(lockstep.BLOCK):  # the next deletion, after the follower acknowledged
        leader.send({"op": "decode", "i": i})
    # what was read is gone but for the block in use and the last acknowledgement's lag
    assert store.ops() <= 2 * lockstep.BLOCK
    assert leader.stop_requested() is None
    follower.request_stop("SIGTERM")
    assert leader.stop_requested() == "process 1: SIGTERM"


def test_a_lost_process_0_is_an_error_not_a_hang():
    class Gone(Store):
        def blocking_key_value_get(self, key, timeout_ms):
            raise RuntimeError("UNAVAILABLE: failed to connect to all addresses")

    _, follower = pair(Gone())
    with pytest.raises(lockstep.DistributedError, match="process 1 lost process 0"):
        follower.receive()


def test_a_follower_replays_the_scheduler_exactly(engine):  # noqa: F811
    """A scheduler over the Leader (prefills in chunks, decodes, releases, prefix extracts,
    inserts and evictions) and a Follower on Slots of its own: the same tokens as each prompt
    alone, and at the end the same device state and host positions on both sides, and the
    same live prefixes."""
    store = Store()
    to_followers, from_leader = pair(store)
    make = lambda: Slots(engine.weights, 2, 128, chunk=16, kv_block=32)  # noqa: E731
    mine, theirs = make(), make()
    leader = lockstep.Leader(mine, to_followers)
    follower = lockstep.Follower(theirs, from_leader, on_error=lambda text: errors.append(text))
    errors: list[str] = []
    thread = threading.Thread(target=follower.run)
    thread.start()
    # a budget of about two prefixes, so later ones evict earlier ones
    sched = Scheduler(lambda: leader, length=128, vocab_size=CFG.vocab_size,
                      prefix_cache_bytes=2 * mine.prefix_bytes(64)).start()
    try:
        assert sched.ready.wait(60)
        prompts = [PROMPTS[5], PROMPTS[2], PROMPTS[5], PROMPTS[7], PROMPTS[3], PROMPTS[5]]
        queues = []
        for p in prompts:
            q = queue.Queue()
            sched.submit(Request(p, 6, sink=q.put, params=GREEDY, stop_ids=frozenset()))
            queues.append(q)
        cached = []
        for p, q in zip(prompts, queues):
            tokens, done = [], None
            while done is None:
                for e in q.get(timeout=120):
                    if isinstance(e, Token):
                        tokens.append(e.id)
                    else:
                        done = e
            assert tokens == alone(engine, p, 6)
            cached.append(done.cached_tokens)
        assert max(cached) > 0  # prefixes were inserted
    finally:
        sched.shutdown(0)
        sched.join(30)
    leader.stop()
    thread.join(60)
    assert not thread.is_alive() and errors == []
    assert follower.calls == to_followers.sent - 1  # every message but `stop` was a call
    assert np.array_equal(theirs.positions, mine.positions)
    for a, b in zip(jax.tree.leaves((mine.cache, mine.stage, mine.state)),
                    jax.tree.leaves((theirs.cache, theirs.stage, theirs.state))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # the prefixes process 0 keeps, and no others, are kept by the follower
    live = {e.handle.id for e in sched.prefix._entries.values()}
    assert live and set(follower.prefixes) == live
    assert store.sent("extract") > len(live)  # some were evicted (and dropped by both)
    assert store.sent("insert") > 0 and store.sent("release") > 0


def test_a_follower_replays_adapter_loads_and_rows(engine, model, tmp_path):  # noqa: F811
    """Adapters loaded at start and between steps, rows of an adapter beside base rows: the
    follower's adapter stack, caches and state end as process 0's."""
    from llama2_jax.inference.adapters import limits_for
    from llama2_jax.inference.weights import Weights
    from llama2_jax.model import adapter
    from tests.conftest import random_adapter
    dirs = [str(tmp_path / name) for name in ("a", "b")]
    for i, d in enumerate(dirs):
        adapter.save(d, random_adapter(CFG, ("wq", "w2"), rank=2, seed=i))
    limits = limits_for(dirs)
    store = Store()
    to_followers, from_leader = pair(store)
    weights = Weights(model)  # the server's: adapters bind to separate q/k/v (not the Engine's)
    make = lambda: Slots(weights, 2, 128, chunk=16, kv_block=32,  # noqa: E731
                         adapters=limits)
    mine, theirs = make(), make()
    leader = lockstep.Leader(mine, to_followers)
    errors: list[str] = []
    follower = lockstep.Follower(theirs, from_leader, on_error=errors.append)
    thread = threading.Thread(target=follower.run)
    thread.start()
    sched = Scheduler(lambda: leader, length=128, vocab_size=CFG.vocab_size,
                      adapters=[("a", dirs[0])]).start()
    try:
        assert sched.ready.wait(60)
        sched.load_adapter("b", dirs[1]).result(60)
        answers = {}
        for name in ("", "a", "b"):
            q = queue.Queue()
            sched.submit(Request(PROMPTS[5], 6, sink=q.put, params=GREEDY, stop_ids=frozenset(),
                                 adapter=name))
            answers[name], done = [], False
            while not done:
                for e in q.get(timeout=120):
                    if isinstance(e, Token):
                        answers[name].append(e.id)
                    done = done or not isinstance(e, Token)
        assert answers[""] == alone(engine, PROMPTS[5], 6)
        assert answers["a"] != answers[""] and answers["b"] != answers[""]
    finally:
        sched.shutdown(0)
        sched.join(30)
    leader.stop()
    thread.join(60)
    assert not thread.is_alive() and errors == []
    assert store.sent("load_adapter") == 2 and store.sent("set_adapter") == 3
    assert np.array_equal(theirs.row_adapter, mine.row_adapter)
    for a, b in zip(jax.tree.leaves((mine.adapters.arrays, mine.cache, mine.state)),
                    jax.tree.leaves((theirs.adapters.arrays, theirs.cache, theirs.state))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
