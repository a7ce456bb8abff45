"""Where a served run's time goes: bench_serve's closed-loop workload driven through the
server's own Scheduler and Slots in this process (no HTTP), first as the server runs it, then
with every device call waited for and timed.

  python benchmarks/profile_served.py                     # 16 clients, greedy and top_p
  python benchmarks/profile_served.py --clients=64 --sampling=greedy --reps=1
  python benchmarks/profile_served.py --kv_block=128,0    # two cache layouts, alternating
  python benchmarks/profile_served.py --attention=kernel,xla   # with and without the CPU kernels
                                                   # (all of them: matmuls, attention, floor)
  python benchmarks/profile_served.py --kv_quantization=none,int8   # float32 / 8-bit KV cache

Workload (as bench_serve's): `clients` closed-loop clients, each submitting its next request
when its previous one ends, `requests_per_client` requests each; prompts of random token ids,
`min_prompt`..`max_prompt` tokens; exactly `new_tokens` generated (no stop token); BENCH_134M
fp32 with random weights; slots = clients, context = max_prompt + new_tokens (bench_serve's
server).

For each (attention, layout, sampling), `reps` times, alternating, so that every case sees the same
machine:
  plain         output tok/s as the server's device loop runs it (the next step dispatched
                before the previous tokens are read)
  instrumented  each device call blocked on and timed: seconds in prefill chunks and in decode
                steps, the rest of the wall time (host work: the scheduler, tokens handed out),
                and the decode steps' mean time by (rows computed, positions attended)
The instrumented run loses the overlap of host and device work (little, on CPU).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import pin_threads  # noqa: E402
from llama2_jax.inference.params import SamplingParams  # noqa: E402
from llama2_jax.inference.requests import Done, Request  # noqa: E402
from llama2_jax.inference.scheduler import Scheduler  # noqa: E402
from llama2_jax.inference.slots import Slots  # noqa: E402
from llama2_jax.inference.weights import EngineOptions, Weights  # noqa: E402
from llama2_jax.model import checkpoint  # noqa: E402
from llama2_jax.model.config import BENCH_134M  # noqa: E402

SAMPLING = {"greedy": SamplingParams(temperature=0.0, top_p=1.0),
            "top_p": SamplingParams(temperature=0.6, top_p=0.9, seed=1)}
TIMED = ("prefill", "decode")


class Timed:
    """The Slots' prefill and decode, each call waited for and timed (by kind, and decode
    steps by their (rows, attend) shape)."""

    def __init__(self, slots: Slots):
        self.slots, self.seconds = slots, collections.defaultdict(list)

    def __enter__(self):
        for name in TIMED:
            setattr(self.slots, name, self._wrap(name, getattr(self.slots, name)))
        return self

    def __exit__(self, *exc):
        for name in TIMED:
            delattr(self.slots, name)  # the instance attribute: the class's method again

    def _wrap(self, name, fn):
        slots = self.slots

        def timed(*args, **kwargs):
            shape = slots.shapes.decode_shape(slots.positions) if name == "decode" else None
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            jax.block_until_ready(jax.tree.leaves(out))
            dt = time.perf_counter() - t
            self.seconds[name].append(dt)
            if shape:
                self.seconds[shape].append(dt)
            return out
        return timed


def closed_loop(slots: Slots, prompts, clients: int, new: int, params: SamplingParams) -> dict:
    """Run `prompts` through a fresh Scheduler over `slots`, `clients` at a time."""
    sched = Scheduler(lambda: slots, length=slots.length, vocab_size=slots.config.vocab_size,
                      max_queue=len(prompts))
    sched.open()
    todo = iter(prompts)
    tokens = [0]

    def submit():
        prompt = next(todo, None)
        if prompt is not None:
            sched.submit(Request(prompt, new, sink, params, stop_ids=frozenset()))

    def sink(events):
        for e in events:
            if isinstance(e, Done):
                submit()
            else:
                tokens[0] += 1

    for _ in range(clients):
        submit()
    t, turns = time.perf_counter(), 0
    while sched.busy:
        sched.step()
        turns += 1
    wall = time.perf_counter() - t
    return {"wall_s": wall, "turns": turns, "tokens": tokens[0], "tok_s": tokens[0] / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests_per_client", type=int, default=2)
    ap.add_argument("--min_prompt", type=int, default=16)
    ap.add_argument("--max_prompt", type=int, default=512)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--prefill_chunk", type=int, default=256)
    ap.add_argument("--kv_block", default="0", help="comma list; 0 = the default layout")
    ap.add_argument("--sampling", default="greedy,top_p")
    ap.add_argument("--kv_quantization", default="none", help="comma list of none/int8/fp8")
    ap.add_argument("--attention", default="kernel",
                    help="comma list of kernel (every llama2_jax.model.cpu_kernels kernel: "
                    "matmuls over packed weights, attention, top-p's floor) / xla (none)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    pin_threads(os.cpu_count())
    context = args.max_prompt + args.new_tokens
    cfg = dataclasses.replace(BENCH_134M, max_seq_len=context)
    model = checkpoint.random_model(cfg, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    n = args.clients * args.requests_per_client
    prompts = [rng.integers(3, cfg.vocab_size, rng.integers(args.min_prompt, args.max_prompt + 1))
               .tolist() for _ in range(n)]
    layouts, weights_by = {}, {}
    for attention, kv, kvq in itertools.product(args.attention.split(","),
                                                (int(k) for k in args.kv_block.split(",")),
                                                args.kv_quantization.split(",")):
        t = time.perf_counter()
        if attention not in weights_by:  # one per-layer copy of the weights per path
            weights_by[attention] = Weights(model, options=EngineOptions(
                cpu_kernels=attention == "kernel"))
        weights = weights_by[attention]
        if weights.cpu_kernels != (attention == "kernel"):
            sys.exit(f"--attention={attention}: the kernel is not available here")
        slots = Slots(weights, args.clients, context, chunk=args.prefill_chunk,
                      kv_block=kv or None, kv_quantization=kvq)
        slots.warm_up()
        name = (f"{attention}, cache {kvq}, kv_block {slots.shapes.kv_block}, "
                f"blocks {slots.shapes.blocks}")
        layouts[name] = slots
        print(f"{name}: row groups {slots.shapes.groups}, compiled in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
    print(f"{n} requests, {args.clients} clients, prompts {args.min_prompt}-{args.max_prompt} "
          f"tokens ({sum(map(len, prompts))} in all), {args.new_tokens} new each; "
          f"jax {jax.__version__}, {os.cpu_count()} threads", flush=True)
    results = collections.defaultdict(list)
    for rep in range(args.reps):
        for name, slots in layouts.items():
            for sampling in args.sampling.split(","):
                params = SAMPLING[sampling]
                plain = closed_loop(slots, prompts, args.clients, args.new_tokens, params)
                with Timed(slots) as timed:
                    inst = closed_loop(slots, prompts, args.clients, args.new_tokens, params)
                device = {k: sum(timed.seconds[k]) for k in TIMED}
                shapes = {f"{r} rows, attend {a}": v for (r, a), v in sorted(
                    (k, v) for k, v in timed.seconds.items() if isinstance(k, tuple))}
                inst.update({f"{k}_s": v for k, v in device.items()},
                            host_s=inst["wall_s"] - sum(device.values()),
                            decode_calls=len(timed.seconds["decode"]),
                            prefill_calls=len(timed.seconds["prefill"]),
                            decode_ms_by_shape={k: 1e3 * statistics.mean(v)
                                                for k, v in shapes.items()},
                            decode_calls_by_shape={k: len(v) for k, v in shapes.items()})
                results[(name, sampling)].append({"plain": plain, "instrumented": inst})
                print(f"rep {rep} | {name} | {sampling} | plain {plain['tok_s']:.1f} tok/s "
                      f"({plain['wall_s']:.1f} s) | instrumented {inst['wall_s']:.1f} s: "
                      f"prefill {inst['prefill_s']:.1f} s in {inst['prefill_calls']} chunks, "
                      f"decode {inst['decode_s']:.1f} s in {inst['decode_calls']} steps, "
                      f"host {inst['host_s']:.1f} s", flush=True)
    print("\n| attention, layout | sampling | plain tok/s (median of reps) | prefill s | decode s "
          "| host s | decode ms by (rows, attend), most frequent |")
    print("|---|---|---:|---:|---:|---:|---|")
    for (name, sampling), runs in results.items():
        inst = runs[-1]["instrumented"]
        top = sorted(inst["decode_calls_by_shape"].items(), key=lambda kv: -kv[1])[:3]
        shapes = "; ".join(f"{k}: {inst['decode_ms_by_shape'][k]:.1f} ({c} steps)"
                           for k, c in top)
        print(f"| {name} | {sampling} | "
              f"{statistics.median(r['plain']['tok_s'] for r in runs):.1f} | "
              f"{inst['prefill_s']:.1f} | {inst['decode_s']:.1f} | {inst['host_s']:.1f} | "
              f"{shapes} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{k[0]} | {k[1]}": v for k, v in results.items()}, f, indent=1)


if __name__ == "__main__":
    main()
