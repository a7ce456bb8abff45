"""Serve a model behind an OpenAI-compatible endpoint: `python -m llama2_jax.serve --config ...`.

  python -m llama2_jax.serve --config configs/serve_demo.py          # CPU, nothing to download
  python -m llama2_jax.serve --config configs/serve_7b_chat.py \\
      --config.checkpoint_dir=/data/llama-2-7b-chat --config.port=8000

Start-up: the settings are checked first (a bad one fails at once, with one line); then the
HTTP server listens while the model loads and its steps compile on the device thread
(/health answers 503 until they are done, 200 after). SIGTERM (or Ctrl-C) stops accepting
requests (503), lets the running ones finish for up to `shutdown_grace_s` seconds, aborts the
rest and exits 0; a second signal exits at once. With `multihost` (one process per host),
process 0 serves and the others follow its device calls (llama2_jax.inference.lockstep). Fields:
`base_config` below, beside the model fields every app has (llama2_jax.settings.model_fields).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import TextIO

import ml_collections
import uvicorn

from llama2_jax import demo
from llama2_jax import settings as app_build
from llama2_jax import distributed
from llama2_jax.inference import lockstep
from llama2_jax.inference.slots import Slots
from llama2_jax.settings import USER_ERRORS, SettingsError
from llama2_jax.inference.weights import Weights
from llama2_jax.inference.scheduler import Scheduler
from llama2_jax.serve.api import Server, create_app
from llama2_jax.serve.metrics import Metrics

API_KEY_ENV = "LLAMA2_JAX_API_KEY"


def base_config() -> ml_collections.ConfigDict:
    """Every server setting with its default; configs/serve_*.py start from this."""
    c = app_build.inference_fields(ml_collections.ConfigDict())
    c.host = "127.0.0.1"  # "0.0.0.0" to accept connections from other machines
    c.port = 8000
    c.model_name = ""  # the name clients send as `model`; "" = the checkpoint directory's
    c.api_key = ""  # required as "Authorization: Bearer <key>"; "" = $LLAMA2_JAX_API_KEY or none
    c.max_slots = 8  # requests decoded together; each holds context_length positions of KV
    c.max_queue = 64  # requests that may wait for a slot; one more gets 429
    c.prefill_chunk = 256  # prompts are prefilled this many tokens at a time between decodes
    c.prefix_cache_mb = 256  # device memory for reused prompt prefixes (0 = off)
    c.max_body_mb = 1.0  # larger request bodies get 413
    c.temperature = 0.6  # for requests that leave it out (Meta's chat defaults)
    c.top_p = 0.9
    c.warmup = True  # compile every step at start, so no request waits for a compile
    # ... including the prefill steps that return every prompt position's logits (`echo` with
    # `logprobs`, as lm-eval asks); False: those compile when the first such request comes
    c.warmup_prompt_logprobs = True
    c.shutdown_grace_s = 30.0
    # LoRA adapters served over the one base, a request's `model` naming one: "name=dir,..."
    # (directories from llama2_jax.finetune's final_adapter/ or convert/peft_to_adapter.py).
    c.adapters = ""
    # Room for adapters on the devices, fixed at start (every step pays for it; loading one
    # at run time, POST /v1/load_lora_adapter, compiles nothing): how many at once (0 = as
    # many as `adapters` lists; none and 0 = no adapters), their highest rank (0 = the highest
    # of `adapters`, or 16) and the weights they may change ("" = those of `adapters`, or all
    # of wq,wk,wv,wo,w1,w2,w3).
    c.max_loras = 0
    c.max_lora_rank = 0
    c.lora_targets = ""
    c.log_requests = False  # uvicorn's access log
    return c


def model_name(config: ml_collections.ConfigDict) -> str:
    if config.model_name:
        return config.model_name
    if config.checkpoint_dir:
        path = os.path.normpath(os.path.expanduser(config.checkpoint_dir))
        name = os.path.basename(path)
        return os.path.basename(os.path.dirname(path)) if name == "final" else name
    return f"random-{config.model_preset}"


def check(config: ml_collections.ConfigDict) -> None:
    for name, low in (("max_slots", 1), ("max_queue", 0), ("prefill_chunk", 1),
                      ("prefix_cache_mb", 0), ("max_loras", 0), ("max_lora_rank", 0)):
        if config[name] < low:
            raise SettingsError(f"{name}={config[name]} must be >= {low}")
    if not 0 < config.port < 65536:
        raise SettingsError(f"port={config.port} must be in 1..65535")
    if config.max_body_mb <= 0 or config.shutdown_grace_s < 0:
        raise SettingsError("max_body_mb must be > 0 and shutdown_grace_s >= 0")
    for name, _ in app_build.adapter_list(config):
        if name == model_name(config):
            raise SettingsError(f"adapters: {name!r} is the base model's name")
    if not 0 < config.top_p <= 1 or config.temperature < 0:
        raise SettingsError(f"temperature={config.temperature} must be >= 0 and "
                            f"top_p={config.top_p} in (0, 1]")


def _slots(config: ml_collections.ConfigDict, prepared: app_build.Prepared, length: int,
           err: TextIO) -> Slots:
    model = prepared.load(err)
    slots = Slots(Weights(model, prepared.mesh), config.max_slots, length,
                  chunk=config.prefill_chunk,
                  adapters=app_build.adapter_limits(config),
                  kv_quantization=app_build.kv_method(config))
    err.write(app_build.banner("serve", model, prepared.source, prepared.mesh, length))
    return slots


def make_server(config: ml_collections.ConfigDict, err: TextIO,
                channel: lockstep.Channel | None = None) -> Server:
    """The Server `config` describes; its model loads when the scheduler starts. With
    `channel` (process 0 of several), its device calls are replayed by the other processes."""
    check(config)
    app_build.adapter_limits(config)  # a bad adapter fails now, not after the model loaded
    demo.ensure_trained(config, err)
    prepared = app_build.prepare(config, err, "serve")
    length = app_build.context_length(prepared.model_config, config.context_length)
    name = model_name(config)

    def load() -> Slots:
        t0 = time.perf_counter()
        slots = _slots(config, prepared, length, err)
        if channel is not None:
            slots = lockstep.Leader(slots, channel)
        if config.warmup:
            err.write(f"compiling the steps of {config.max_slots} slots x {length} positions"
                      " ...\n")
            err.flush()
            slots.warm_up(config.warmup_prompt_logprobs)
        err.write(f"ready in {time.perf_counter() - t0:.1f} s: serving '{name}' on "
                  f"http://{config.host}:{config.port}/v1 ({slots.compile_count} compiled "
                  "steps)\n")
        err.flush()
        return slots

    metrics = Metrics()
    scheduler = Scheduler(load, length=length, vocab_size=prepared.model_config.vocab_size,
                          max_queue=config.max_queue,
                          prefix_cache_bytes=int(config.prefix_cache_mb * (1 << 20)),
                          observer=metrics, adapters=app_build.adapter_list(config))
    metrics.watch(scheduler)
    return Server(scheduler, prepared.tokenizer, metrics, name,
                  api_key=config.api_key or os.environ.get(API_KEY_ENV, ""),
                  max_body_bytes=int(config.max_body_mb * (1 << 20)),
                  temperature=config.temperature, top_p=config.top_p)


class _Uvicorn(uvicorn.Server):
    """uvicorn, with SIGTERM/SIGINT draining the scheduler first (and exit status 0)."""

    def __init__(self, config: uvicorn.Config, server: Server, grace: float, err: TextIO):
        super().__init__(config)
        self.app_server, self.grace, self.err = server, grace, err
        self.draining = False
        self.failed = False

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, sig, frame) -> None:
        if self.draining:  # a second signal: now
            self.should_exit = self.force_exit = True
            return
        self.drain(signal.Signals(sig).name)

    def drain(self, why: str) -> None:
        """Stop accepting requests, finish the running ones, then exit."""
        if self.draining:
            return
        self.draining = True
        self.err.write(f"{why}: no new requests; finishing the running ones (up to "
                       f"{self.grace:g} s) ...\n")
        self.err.flush()
        self.app_server.scheduler.shutdown(self.grace)
        threading.Thread(target=self._exit_when_drained, daemon=True).start()

    def watch_followers(self, channel: lockstep.Channel) -> None:
        """Drain when another process was asked to stop (SIGTERM to every host, or to one)."""
        while not self.should_exit:
            why = channel.stop_requested()
            if why is not None:
                self.drain(why)
                return
            time.sleep(0.5)

    def _exit_when_drained(self) -> None:
        self.app_server.scheduler.join(self.grace + 30)
        self.should_exit = True

    def watch_loading(self) -> None:
        """Exit (status 1) if the model cannot be loaded: such a server can never answer."""
        s = self.app_server.scheduler
        while s.alive and not s.ready.is_set():
            time.sleep(0.05)
        if not s.ready.is_set():
            self.err.write(f"error: loading the model failed: {s.error}\n")
            self.failed = self.should_exit = True


def run(config: ml_collections.ConfigDict, err: TextIO | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status."""
    err = sys.stderr if err is None else err
    try:
        distributed.initialize(config)
        channel = lockstep.Channel() if config.multihost else None
        if channel is not None and not distributed.is_main_process():
            return follow(config, channel, err)
        server = make_server(config, err, channel)
    except USER_ERRORS as e:
        err.write(f"error: {e}\n")
        return 1
    uv_config = uvicorn.Config(create_app(server), host=config.host, port=config.port,
                               log_level="info" if config.log_requests else "warning",
                               access_log=config.log_requests, timeout_graceful_shutdown=5)
    uv = _Uvicorn(uv_config, server, config.shutdown_grace_s, err)
    server.scheduler.start()
    threading.Thread(target=uv.watch_loading, daemon=True).start()
    if channel is not None:
        threading.Thread(target=uv.watch_followers, args=(channel,), daemon=True).start()
    try:
        uv.run()
    finally:
        server.scheduler.shutdown(0)
        server.scheduler.join(10)
        if channel is not None:  # after the scheduler's last call: the followers return
            channel.send({"op": "stop"})
    if uv.failed:
        return 1
    err.write("server stopped\n")
    return 0


def follow(config: ml_collections.ConfigDict, channel: lockstep.Channel, err: TextIO) -> int:
    """A process other than 0 of a multi-process server: load the model and make process 0's
    device calls until it stops. SIGTERM asks process 0 to drain (a second one exits)."""
    check(config)
    demo.ensure_trained(config, err)
    prepared = app_build.prepare(config, err, "serve")
    length = app_build.context_length(prepared.model_config, config.context_length)
    slots = _slots(config, prepared, length, err)
    me = f"process {distributed.process_index()}"
    err.write(f"{me}: following process 0, which serves http://{config.host}:{config.port}"
              "/v1\n")
    err.flush()
    asked = []

    def on_signal(sig, frame):
        if asked:
            raise SystemExit(128 + sig)
        asked.append(sig)
        err.write(f"{me}: {signal.Signals(sig).name}: asking process 0 to drain the server\n")
        err.flush()
        channel.request_stop(signal.Signals(sig).name)

    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, on_signal)
    calls = lockstep.Follower(slots, channel, on_error=err.write).run()
    err.write(f"{me}: process 0 stopped the server after {calls} calls\n")
    return 0
