"""One server over several JAX processes: process 0 decides, every process computes.

JAX runs one program per process (multi-controller): a jitted step over a mesh that spans
several hosts runs only when every process calls it, with the same shapes, in the same order.
So process 0 runs the scheduler and the HTTP server alone, and its `Leader` publishes each
call it makes to its Slots (prefill, decode, release, insert, extract, warm-up) before making
it; the other processes (`Follower`) make the same calls on their own Slots, whose host state
(positions, the staging row) therefore stays the same as process 0's. Requests, cancellations
and disconnects are scheduler decisions, so they reach the followers as the calls they lead
to; shutdown is a `stop` message. A follower asked to stop (SIGTERM) asks process 0, which
drains the server and then sends `stop` to all.

The calls travel, in order, through the key-value store of JAX's coordination service (the one
`jax.distributed` runs on process 0): a message is a small JSON object under an increasing
index; the followers acknowledge what they have read, and process 0 deletes what all have.
A process that dies stops the others through the coordination service's heartbeats
(`heartbeat_timeout_s`), never a hang.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import sys
import threading
import traceback
import weakref
from typing import Callable

import jax
import numpy as np

from llama2_jax import distributed
from llama2_jax.distributed import DistributedError
from llama2_jax.inference.params import SamplingParams
from llama2_jax.inference.stepper import REPLAYED
from llama2_jax.inference.slots import Slots
from llama2_jax.inference.step_io import Prefix

BLOCK = 256  # messages per key directory: deleted a directory at a time
POLL_MS = 1000  # a follower waits this long per try for the next message (then checks again)


class Channel:
    """Ordered messages from process 0 to the others over the coordination service."""

    def __init__(self, name: str = "serve", client=None, *, processes: int | None = None,
                 process: int | None = None):
        self.prefix = f"llama2_jax/{name}/"
        self.client = client if client is not None else distributed.coordination_client()
        self.followers = (jax.process_count() if processes is None else processes) - 1
        self.process = jax.process_index() if process is None else process
        self.sent = 0  # process 0: messages published
        self.received = 0  # a follower: messages read
        self._deleted = 0  # process 0: blocks deleted
        self._lock = threading.Lock()  # the scheduler's thread sends, and the last `stop`

    def _key(self, n: int) -> str:
        return f"{self.prefix}ops/{n // BLOCK}/{n}"

    # -- process 0 ---------------------------------------------------------------------------
    def send(self, message: dict) -> None:
        with self._lock:
            self.client.key_value_set(self._key(self.sent), json.dumps(message))
            self.sent += 1
            if self.sent % BLOCK == 0:
                self._forget()

    def _forget(self) -> None:
        """Delete the blocks every follower has read."""
        read = min((self._acked(i) for i in range(1, self.followers + 1)), default=self.sent)
        while (self._deleted + 1) * BLOCK <= read:
            self.client.key_value_delete(f"{self.prefix}ops/{self._deleted}")
            self._deleted += 1

    def _acked(self, process: int) -> int:
        try:
            return int(self.client.key_value_try_get(f"{self.prefix}ack/{process}"))
        except Exception:  # noqa: BLE001 -- NOT_FOUND: nothing acknowledged yet
            return 0

    def stop_requested(self) -> str | None:
        """Why a follower asked to stop, or None."""
        try:
            return self.client.key_value_try_get(f"{self.prefix}stop_requested")
        except Exception:  # noqa: BLE001 -- NOT_FOUND
            return None

    # -- the other processes -----------------------------------------------------------------
    def receive(self) -> dict:
        """The next message; waits for it as long as process 0 lives (process 0's death ends
        the wait with DistributedError, or ends this process through the heartbeats)."""
        key = self._key(self.received)
        while True:
            try:
                text = self.client.blocking_key_value_get(key, POLL_MS)
                break
            except Exception as e:  # noqa: BLE001 -- JaxRuntimeError
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise DistributedError(f"process {self.process} lost process 0 "
                                           f"(waiting for message {self.received}): "
                                           f"{str(e).splitlines()[0]}") from None
        self.received += 1
        if self.received % (BLOCK // 4) == 0:
            self.client.key_value_set(f"{self.prefix}ack/{self.process}",
                                      str(self.received), allow_overwrite=True)
        return json.loads(text)

    def request_stop(self, why: str) -> None:
        self.client.key_value_set(f"{self.prefix}stop_requested",
                                  f"process {self.process}: {why}", allow_overwrite=True)


class SharedPrefix:
    """A Prefix that every process holds: the followers keep theirs under `id` until process
    0's copy is dropped (by the prefix cache; a weak reference tells)."""

    def __init__(self, prefix: Prefix, id: int):
        self.prefix, self.id = prefix, id
        self.nbytes = prefix.nbytes


# How each replayed call's arguments travel (JSON) and are rebuilt: the one table of the
# protocol, read by the Leader to send and by the Follower to replay. A Prefix argument travels
# as its id; a call whose result is a Prefix is kept by the Follower under the id it is sent.
def _encode(value):
    if isinstance(value, SamplingParams):
        return {"params": dataclasses.asdict(value)}
    if isinstance(value, SharedPrefix):
        return {"prefix": value.id}
    if value is None:
        return None
    if isinstance(value, np.ndarray):  # a bitmask of allowed tokens
        return {"int32": value.astype(np.int32).tolist()}
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    if isinstance(value, str):  # an adapter's directory
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    return int(value)


def _decode(value, prefixes: dict[int, Prefix]):
    if isinstance(value, dict):
        if "params" in value:
            return SamplingParams(**value["params"])
        if "int32" in value:
            return np.asarray(value["int32"], np.int32)
        return prefixes[value["prefix"]]
    return value


class Leader:
    """Process 0's Slots: each call of REPLAYED is sent to the followers before it is made
    here; the read-only ones are answered by process 0 alone. The scheduler uses it as it
    uses Slots (both are Steppers)."""

    def __init__(self, slots: Slots, channel: Channel):
        self.slots, self.channel = slots, channel
        self._ids = itertools.count()
        self._dropped: list[int] = []  # prefix ids process 0 no longer holds
        for op in REPLAYED:
            setattr(self, op, functools.partial(self._call, op))

    max_slots = property(lambda self: self.slots.max_slots)
    chunk = property(lambda self: self.slots.chunk)
    length = property(lambda self: self.slots.length)
    compile_count = property(lambda self: self.slots.compile_count)
    max_adapters = property(lambda self: self.slots.max_adapters)

    def prefix_bytes(self, length: int) -> int:
        return self.slots.prefix_bytes(length)

    def _call(self, op: str, *args):
        message = {"op": op, "args": [_encode(a) for a in args]}
        if op == "extract":
            message["id"] = n = next(self._ids)
        if self._dropped:  # appended to by the finalizers of dropped prefixes
            drop = self._dropped[:]
            del self._dropped[:len(drop)]
            message["drop"] = drop
        self.channel.send(message)
        result = getattr(self.slots, op)(*[a.prefix if isinstance(a, SharedPrefix) else a
                                           for a in args])
        if op == "extract":
            result = SharedPrefix(result, n)
            weakref.finalize(result, self._dropped.append, n)
        return result

    def stop(self) -> None:
        """Tell the followers to return (the server is done)."""
        self.channel.send({"op": "stop"})


class Follower:
    """A process other than 0: makes process 0's calls on its own `slots` (see `run`)."""

    def __init__(self, slots: Slots, channel: Channel,
                 on_error: Callable[[str], None] | None = None):
        self.slots, self.channel = slots, channel
        self.report = on_error or sys.stderr.write
        self.prefixes: dict[int, Prefix] = {}  # process 0's live SharedPrefixes, by id
        self.calls = 0

    def run(self) -> int:
        """Make process 0's calls until it sends `stop`; returns how many were made. A call
        that fails here failed on process 0 too (same arguments, same host state): it is
        reported and the next one follows, as process 0's scheduler goes on."""
        while True:
            message = self.channel.receive()
            for n in message.get("drop", ()):
                self.prefixes.pop(n, None)
            op = message["op"]
            if op == "stop":
                return self.calls
            if op not in REPLAYED:
                raise DistributedError(f"unknown message from process 0: {message!r}")
            self.calls += 1
            try:
                args = [_decode(a, self.prefixes) for a in message["args"]]
                result = getattr(self.slots, op)(*args)
                if "id" in message:
                    self.prefixes[message["id"]] = result
            except Exception:  # noqa: BLE001 -- process 0 met the same error and went on
                self.report(f"process {self.channel.process}, call {self.channel.received - 1}"
                            f" ({op}):\n{traceback.format_exc()}")
