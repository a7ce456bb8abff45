"""The serving loop: requests in from any thread, tokens out, one thread owning the device.

JetStream's orchestrator, in one loop: each turn takes new requests, drops cancelled ones,
gives free slots to waiting requests, dispatches one prefill chunk (so a long prompt never
stalls the running streams for longer than a chunk) and one decode step over all slots, and
reads the output of the step before (the device computes while the host hands out tokens).

Thread safety: `submit`, `cancel`, `shutdown` and the read-only properties may be called
from any thread and never touch JAX; everything else runs on the loop's own thread. A
request's events reach its `sink` from that thread, a list per step.

Admission: requests wait in a bounded queue (`max_queue`; past it `submit` raises QueueFull)
until a slot is free; every slot owns `length` positions of KV cache, so a request whose
prompt plus `max_tokens` fits the slot always fits (checked by `submit`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
import traceback
from typing import Callable, Sequence

import numpy as np

from llama2_jax.inference.adapter_names import AdapterNames
from llama2_jax.inference.prefix_cache import PrefixCache
from llama2_jax.inference.requests import (ContextError, Done, Event, Observer, PromptLogprobs,
                                           QueueFull, Quiet, Request, ShuttingDown, Token,
                                           mask_words)
from llama2_jax.inference.stepper import REPLAYED, Stepper  # noqa: F401 (re-exported)


class Scheduler:
    """Drives `Slots` (or any Stepper); see the module docstring. The server runs it on its
    own thread (`start`); offline drivers (generate, a chat Session) call `open` and `step`.

    Args:
      load: builds the Slots (and compiles what it should); called on the loop's thread
        (by `open`), so the server can answer /health while the model loads.
      length: positions per slot (the context a request must fit).
      vocab_size: token ids must be below it.
      max_queue: requests that may wait for a slot; one more is refused with QueueFull.
      prefix_cache_bytes: device bytes for cached prefixes (0: no prefix caching).
      observer: receives timings and counts (default: nothing).
      adapters: (name, directory) of LoRA adapters to load when the slots are built (they
        need room: Slots(adapters=...)); more come and go with `load_adapter` / `unload_adapter`,
        and a Request names the one it runs with.
    """

    def __init__(self, load: Callable[[], Stepper], *, length: int, vocab_size: int,
                 max_queue: int = 64, prefix_cache_bytes: int = 0,
                 observer: Observer | None = None, idle_wait: float = 0.05,
                 adapters: Sequence[tuple[str, str]] = ()):
        self.length, self.vocab_size, self.max_queue = length, vocab_size, max_queue
        self.observer = observer or Quiet()
        self.prefix = PrefixCache(prefix_cache_bytes)
        self._load, self._idle_wait = load, idle_wait
        self._cond = threading.Condition()
        self._inbox: collections.deque[Request] = collections.deque()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: dict[int, Request] = {}  # slot -> request (prefilling or decoding)
        self._stopping = False
        self._deadline = float("inf")
        self.slots: Stepper | None = None
        self._pending: collections.deque = collections.deque()  # (StepOut, [(row, request)])
        self._startup_adapters = tuple(adapters)
        self.adapters = AdapterNames(0)  # its capacity is the slots', known when they are built
        self._loads: collections.deque = collections.deque()  # (Loaded, Future) to make
        self.ready = threading.Event()
        self.error: str | None = None  # why loading failed
        self.compiles_at_ready = 0
        self._thread = threading.Thread(target=self._main, name="llama2_jax-device", daemon=True)

    # -- any thread --------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise ContextError unless a prompt of this size and its answer fit a slot."""
        if prompt_tokens < 1:
            raise ContextError("the prompt is empty: it needs at least one token")
        if max_tokens < 0:
            raise ContextError(f"max_tokens must be >= 0, got {max_tokens}")
        if prompt_tokens + max(max_tokens, 1) > self.length:  # room for the token drawn
            raise ContextError(
                f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: "
                f"{prompt_tokens + max_tokens} tokens, over the context of {self.length}")

    def submit(self, request: Request) -> None:
        """Queue `request`; raises ContextError, ValueError, QueueFull or ShuttingDown."""
        self.check(len(request.prompt), request.max_tokens)
        bad = [t for t in request.prompt if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary "
                             f"0..{self.vocab_size - 1}")
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._inbox) + len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting for a slot")
            if request.adapter:  # UnknownAdapter if it is not (or no longer) loaded
                request.lora = self.adapters.acquire(request.adapter)
            request.arrival = time.perf_counter()
            self._inbox.append(request)
            self._cond.notify()

    def load_adapter(self, name: str, directory: str) -> concurrent.futures.Future:
        """Load the LoRA adapter in `directory` as `name`, on the loop's thread between two
        steps: the future ends when requests may name it (or with the error that stopped it:
        AdapterConflict at once, AdapterError / ValueError from the directory)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            entry = self.adapters.reserve(name, directory)
            self._loads.append((entry, future))
            self._cond.notify()
        return future

    def unload_adapter(self, name: str) -> None:
        """New requests cannot name it; those running finish with it (UnknownAdapter if no
        such adapter is loaded)."""
        self.adapters.unload(name)

    def cancel(self, request: Request) -> None:
        request.cancel()
        with self._cond:
            self._cond.notify()

    def shutdown(self, grace: float) -> None:
        """Refuse new requests; finish the accepted ones for up to `grace` seconds, then abort
        the rest and stop the loop."""
        with self._cond:
            self._stopping = True
            self._deadline = min(self._deadline, time.perf_counter() + grace)
            self._cond.notify()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return self.ready.is_set() and not self._stopping and self.alive

    @property
    def queue_depth(self) -> int:
        return len(self._inbox) + len(self._waiting)

    @property
    def active_slots(self) -> int:
        return len(self._running)

    @property
    def compile_count(self) -> int:
        return self.slots.compile_count if self.slots is not None else 0

    # -- the loop's thread -------------------------------------------------------------------
    def open(self) -> None:
        """Build the slots (`load`); then requests can be stepped."""
        self.slots = self._load()
        self.adapters = AdapterNames(self.slots.max_adapters)
        for name, directory in self._startup_adapters:
            entry = self.adapters.reserve(name, directory)
            self.slots.load_adapter(entry.index, directory)
            self.adapters.ready(entry)
        self.compiles_at_ready = self.slots.compile_count
        self._free = list(range(self.slots.max_slots))[::-1]  # pop() gives the lowest slot
        self.ready.set()

    @property
    def busy(self) -> bool:
        """Whether some request is waiting, running or has tokens on their way."""
        return bool(self._inbox or self._waiting or self._running or self._pending
                    or self._loads)

    def step(self) -> None:
        """One turn: admit waiting requests to free slots, dispatch one prefill chunk and one
        decode step, and deliver the tokens of the step before (the device computes the next
        one meanwhile). Called by the loop's thread only (or by an offline driver)."""
        with self._cond:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            loads = [self._loads.popleft() for _ in range(len(self._loads))]
        for entry, future in loads:  # between steps: no slot uses a free index
            try:
                self.slots.load_adapter(entry.index, entry.directory)
            except Exception as e:  # noqa: BLE001 -- the caller's error, the loop goes on
                self.adapters.abort(entry)
                future.set_exception(e)
            else:
                self.adapters.ready(entry)
                future.set_result(entry.name)
        pending = self._pending
        self._drop_cancelled()
        self._admit()
        dispatched = self._prefill_one(pending)
        decoding = self._decoding()
        allowed = None
        if any(r.constraint is not None for _, r in decoding):
            # A grammar's next mask needs the token before: no step runs ahead of its rows.
            while pending:
                self._deliver(*pending.popleft())
            decoding = self._decoding()
            allowed = self._masks(decoding)
        if decoding:
            pending.append((self.slots.decode(allowed) if allowed is not None
                            else self.slots.decode(), decoding))
            dispatched = True
        while len(pending) > (1 if dispatched else 0):
            self._deliver(*pending.popleft())

    def _decoding(self) -> list[tuple[int, Request]]:
        return [(s, r) for s, r in self._running.items()
                if r.cursor == len(r.prompt) and not r.done]

    def _masks(self, decoding) -> np.ndarray | None:
        """Each constrained slot's bitmask of allowed tokens (zero rows: unconstrained)."""
        rows = [(s, r) for s, r in decoding if r.constraint is not None]
        if not rows:
            return None
        masks = np.zeros((self.slots.max_slots, mask_words(self.vocab_size)), np.int32)
        for s, r in rows:
            r.constraint.fill_mask(masks[s])
        return masks

    def _main(self) -> None:
        try:
            self.open()
        except Exception as e:  # noqa: BLE001 -- reported by /health, the loop never starts
            self.error = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            return
        try:
            self._loop()
        except Exception as e:  # noqa: BLE001 -- a bug: fail every request, never hang them
            self.error = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            for r in [*self._running.values(), *self._waiting, *self._inbox]:
                self._finish(r, "error", error="internal error: " + self.error, store=False)
            self._refuse_loads("internal error: " + self.error)
        finally:
            with self._cond:
                self._stopping = True

    def _loop(self) -> None:
        while True:
            with self._cond:
                idle = not self.busy
                if self._stopping and (idle or time.perf_counter() >= self._deadline):
                    break
                if idle:
                    self._cond.wait(self._idle_wait)
                    continue
            self.step()
        while self._pending:
            self._deliver(*self._pending.popleft())
        for r in [*self._running.values(), *self._waiting]:
            self._finish(r, "abort", store=False)
        self._refuse_loads("the server shut down before the adapter was loaded")

    def _refuse_loads(self, why: str) -> None:
        with self._cond:
            loads = [self._loads.popleft() for _ in range(len(self._loads))]
        for entry, future in loads:
            self.adapters.abort(entry)
            future.set_exception(ShuttingDown(why))

    def _drop_cancelled(self) -> None:
        for r in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(r)
            self._finish(r, "cancelled", store=False)
        for r in [r for r in self._running.values() if r.cancelled]:
            self._finish(r, "cancelled")

    def _admit(self) -> None:
        while self._free and self._waiting:
            r = self._waiting.popleft()
            r.slot = self._free.pop()
            self._running[r.slot] = r
            if self.slots.max_adapters:  # the slot is idle until its prefill: safe to switch
                self.slots.set_adapter(r.slot, r.lora.index if r.lora else 0)

    def _prefill_one(self, pending) -> bool:
        """Dispatch the next prompt chunk of the oldest request still prefilling."""
        todo = [r for r in self._running.values() if r.cursor < len(r.prompt)]
        if not todo:
            return False
        r = min(todo, key=lambda r: r.arrival)
        slots = self.slots
        try:
            if not r.looked_up and r.reuse:  # the slot's row holds the earlier turns
                r.looked_up = True
                slots.resume(r.slot, r.reuse)
                r.cursor = r.cached = r.reuse
            if not r.looked_up and r.score_prompt:  # every token's logits are needed
                r.looked_up = True
            if not r.looked_up:  # at its first chunk, so a prefix stored just before is found
                r.looked_up = True
                key = self._prefix_key(r, r.prompt)
                hit, handle = self.prefix.lookup(key, len(key) - 1)
                hit = max(hit - (len(key) - len(r.prompt)), 0)
                self.observer.prefix_lookup(len(r.prompt), hit)
                if hit:
                    slots.insert(r.slot, handle)
                    r.cursor = r.cached = hit
            chunk = list(r.prompt[r.cursor:r.cursor + slots.chunk])
            final = r.cursor + len(chunk) == len(r.prompt)
            mask = () if not (final and r.constraint) else (self._first_mask(r),)
            if r.score_prompt:
                following = 0 if final else int(r.prompt[r.cursor + len(chunk)])
                out, scores = slots.prefill_scored(r.slot, chunk, r.cursor, final, r.params,
                                                   following, *mask)
                pending.append((scores, [(r.cursor, len(chunk) - (1 if final else 0), r)]))
            else:
                out = slots.prefill(r.slot, chunk, r.cursor, final, r.params, *mask)
        except Exception as e:  # noqa: BLE001 -- this request fails, the others go on
            traceback.print_exc()
            self._finish(r, "error", error=f"{type(e).__name__}: {e}", store=False)
            return False
        r.cursor += len(chunk)
        if final:
            pending.append((out, [(0, r)]))
            self._store(r, list(r.prompt))
        return True

    def _first_mask(self, r: Request) -> np.ndarray:
        mask = np.zeros(mask_words(self.vocab_size), np.int32)
        r.constraint.fill_mask(mask)
        return mask

    def _deliver(self, out, rows) -> None:
        """Hand the tokens of one step to their requests, finishing those that are done."""
        if not hasattr(out, "tokens"):  # a prompt chunk's PromptScores
            self._deliver_scores(out, *rows[0])
            return
        live = [(row, r) for row, r in rows if not r.done and not r.cancelled]
        if not live:
            return
        want_top = any(r.params.top_logprobs for _, r in live)
        arrays = tuple(out) if want_top else (out.tokens, out.logprob)
        for a in arrays:  # all transfers under way before the first wait
            a.copy_to_host_async()
        tokens, lps, *top = [np.asarray(a) for a in arrays]
        top_ids, top_lps = top if want_top else (None, None)
        now = time.perf_counter()
        for row, r in live:
            t = int(tokens[row])
            if r.max_tokens == 0:  # the prompt alone was asked for (its log-probabilities)
                self._finish(r, "length")
                continue
            if t in r.stop_ids:
                if r.score_prompt:  # echo's logprobs show the stop token too (OpenAI's do)
                    self._emit(r, [Token(t, float(lps[row]), self._top(r, top_ids, top_lps,
                                                                       row, want_top))])
                self._finish(r, "stop")
                continue
            top = self._top(r, top_ids, top_lps, row, want_top)
            r.generated.append(t)
            if len(r.generated) == 1:
                self.observer.first_token(now - r.arrival)
            else:
                self.observer.inter_token(now - r.last_time)
            r.last_time = now
            self._emit(r, [Token(t, float(lps[row]), top)])
            if r.constraint is not None and not r.constraint.consume(t):
                self._finish(r, "error", error=f"the grammar refused token {t}")
            elif r.constraint is not None and r.constraint.complete:
                self._finish(r, "stop")  # the answer is whole: nothing but EOS may follow
            elif len(r.generated) >= r.max_tokens:
                self._finish(r, "length")

    @staticmethod
    def _top(r: Request, top_ids, top_lps, row: int, want_top: bool):
        if not (want_top and r.params.top_logprobs):
            return None
        return tuple(zip(top_ids[row].tolist(), top_lps[row].tolist()))

    def _deliver_scores(self, scores, start: int, n: int, r: Request) -> None:
        if r.done or r.cancelled or n == 0:
            return
        lp, ids, top = (np.asarray(a)[:n] for a in scores)
        self._emit(r, [PromptLogprobs(start, tuple(lp.tolist()), tuple(
            tuple(zip(i, t)) for i, t in zip(ids.tolist(), top.tolist())))])

    def _emit(self, r: Request, events: list[Event]) -> None:
        try:
            r.sink(events)
        except Exception:  # noqa: BLE001 -- a sink that cannot take events: the client is gone
            r.cancelled = True

    def _store(self, r: Request, tokens: list[int]) -> None:
        """Keep the keys/values of `tokens` (valid in r's slot) in the prefix cache."""
        slots, key = self.slots, self._prefix_key(r, tokens)
        if not self.prefix.budget or not self.prefix.wants(key, slots.prefix_bytes(len(tokens))):
            return
        handle = slots.extract(r.slot, len(tokens))
        self.prefix.store(key, handle, handle.nbytes)  # dropped handles are freed by GC

    @staticmethod
    def _prefix_key(r: Request, tokens) -> list[int]:
        """What the prefix cache files `tokens` of r under: an adapter's keys and values are
        its own, so its prefixes start with a mark of its load (never a token id)."""
        return list(tokens) if r.lora is None else [-r.lora.generation, *tokens]

    def _finish(self, r: Request, reason: str, error: str | None = None,
                store: bool = True) -> None:
        if r.done:
            return
        r.done = True
        if r.lora is not None:
            self.adapters.release(r.lora)
        if r.slot is not None and self._running.get(r.slot) is r:
            if store:  # what the slot's cache holds for sure: the prompt, and the answer
                # but for its newest token (which may not have been fed yet), or all of the
                # answer when it stopped at EOS (every answer token was fed to draw it).
                answer = r.generated if reason == "stop" else r.generated[:-1]
                valid = list(r.prompt[:r.cursor]) + (answer if r.cursor == len(r.prompt) else [])
                if len(valid) > len(r.prompt):
                    self._store(r, valid)
            del self._running[r.slot]
            self.slots.release(r.slot)
            self._free.append(r.slot)
            self._free.sort(reverse=True)
        done = Done(reason, len(r.prompt), len(r.generated), r.cached, error)
        self.observer.finished(done)
        self._emit(r, [done])
