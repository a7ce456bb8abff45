"""The server's Prometheus metrics (GET /metrics), in a registry of its own per server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from llama2_jax.inference.requests import Done
from llama2_jax.inference.scheduler import Scheduler

_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
_TTFT = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0)


class Metrics:
    """Counters the HTTP side and the device loop (as its Observer) update."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        p = "llama2_jax_"
        self.requests = Counter(p + "requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.finished_requests = Counter(p + "generations_finished",
                                         "Generations (one per choice) by finish reason",
                                         ["reason"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of finished "
                                     "generations", registry=r)
        self.generated_tokens = Counter(p + "generation_tokens", "Tokens generated",
                                        registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Arrival to first token",
                              buckets=_TTFT, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between two tokens of "
                             "one generation", buckets=_LATENCY, registry=r)
        self.prefix_queries = Counter(p + "prefix_cache_queries", "Prompts looked up in the "
                                      "prefix cache", registry=r)
        self.prefix_hits = Counter(p + "prefix_cache_hits", "Prompts that reused a cached "
                                   "prefix", registry=r)
        self.prefix_hit_tokens = Counter(p + "prefix_cache_hit_tokens", "Prompt tokens "
                                         "reused from the prefix cache", registry=r)
        self.prefix_query_tokens = Counter(p + "prefix_cache_query_tokens", "Prompt tokens "
                                           "looked up in the prefix cache", registry=r)
        self._gauges: dict[str, Gauge] = {}
        self._looked_up = self._reused = 0  # prompt tokens (the hit-rate gauge's terms)

    def watch(self, scheduler: Scheduler) -> None:
        """Gauges read from the scheduler at scrape time (host values only, no JAX)."""
        r, p = self.registry, "llama2_jax_"

        def gauge(name, doc, fn):
            g = Gauge(p + name, doc, registry=r)
            g.set_function(fn)
            self._gauges[name] = g

        gauge("queue_depth", "Requests waiting for a slot", lambda: scheduler.queue_depth)
        gauge("active_slots", "Slots running a request", lambda: scheduler.active_slots)
        gauge("slots", "Decode slots", lambda: scheduler.slots.max_slots if scheduler.slots
              else 0)
        gauge("compiles", "Prefill/decode/insert/extract compilations so far",
              lambda: scheduler.compile_count)
        gauge("compiles_after_ready", "Compilations after warm-up (0 when every shape was "
              "compiled at start)", lambda: max(0, scheduler.compile_count
                                                - scheduler.compiles_at_ready)
              if scheduler.ready.is_set() else 0)
        gauge("prefix_cache_hit_rate", "Share of prompt tokens served from the prefix cache",
              lambda: self._reused / self._looked_up if self._looked_up else 0.0)
        gauge("prefix_cache_entries", "Prefixes held", lambda: len(scheduler.prefix))
        gauge("prefix_cache_bytes", "Device bytes the prefix cache holds",
              lambda: scheduler.prefix.nbytes)
        gauge("lora_adapters", "LoRA adapters requests may name",
              lambda: len(scheduler.adapters.names()))
        gauge("lora_adapter_capacity", "LoRA adapters the devices have room for (max_loras)",
              lambda: scheduler.adapters.capacity)
        gauge("ready", "1 when the model is loaded and requests are accepted",
              lambda: 1.0 if scheduler.accepting else 0.0)

    def text(self) -> bytes:
        return generate_latest(self.registry)

    # -- scheduler.Observer ------------------------------------------------------------------
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.generated_tokens.inc()

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)
        self.generated_tokens.inc()

    def finished(self, done: Done) -> None:
        self.finished_requests.labels(done.reason).inc()
        self.prompt_tokens.inc(done.prompt_tokens)

    def prefix_lookup(self, prompt_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries.inc()
        self.prefix_query_tokens.inc(prompt_tokens)
        self._looked_up += prompt_tokens
        self._reused += hit_tokens
        if hit_tokens:
            self.prefix_hits.inc()
            self.prefix_hit_tokens.inc(hit_tokens)

