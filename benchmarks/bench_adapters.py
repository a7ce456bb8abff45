"""What room for LoRA adapters costs the decode step: the same Slots' step with and without an
adapter stack, alternating, in one process.

  python benchmarks/bench_adapters.py                        # BENCH_134M fp32, 16 rows
  python benchmarks/bench_adapters.py --adapters=4 --rank=16 --targets=wq,wv --rounds=5

A random BENCH_134M model (fp32, per-layer weights as the CPU server runs them); `--adapters`
random adapters of rank `--rank` on `--targets` loaded into a stack of exactly that room. Each
round builds the plain Slots and the adapter Slots, prefills `--rows` rows of `--prompt`
tokens (the adapter rows cycle over base, adapter 1, ..., adapter n) and times `--steps`
decode steps of each, plain first then adapters, best of `--reps`; the ratio per round is
adapters / plain step time. The greedy tokens of base rows are compared between the two (the
stack must not change them).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("XLA_FLAGS", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.common import pin_threads, save_random_adapters  # noqa: E402
from llama2_jax.inference.adapters import Limits  # noqa: E402
from llama2_jax.inference.params import GREEDY  # noqa: E402
from llama2_jax.inference.slots import Slots  # noqa: E402
from llama2_jax.inference.weights import Weights  # noqa: E402
from llama2_jax.model import adapter, checkpoint  # noqa: E402
from llama2_jax.model.config import BENCH_134M  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("adapters", 4, "Adapters in the stack.")
flags.DEFINE_integer("rank", 16, "Their rank (the stack's max rank).")
flags.DEFINE_list("targets", list(adapter.TARGETS), "The weights they adapt.")
flags.DEFINE_integer("rows", 16, "Decoding rows (slots).")
flags.DEFINE_integer("prompt", 200, "Prompt tokens per row.")
flags.DEFINE_integer("steps", 8, "Decode steps per timing.")
flags.DEFINE_integer("reps", 5, "Timings per side and round (the best counts).")
flags.DEFINE_integer("rounds", 3, "Plain / adapters alternations.")
flags.DEFINE_integer("threads", os.cpu_count(), "CPU threads (via affinity).")


def run_side(weights: Weights, limits: Limits | None, dirs: list[str]):
    """(best step seconds, the first row's greedy tokens)."""
    slots = Slots(weights, FLAGS.rows, FLAGS.prompt + 256, chunk=256, adapters=limits)
    for i, d in enumerate(dirs if limits else []):
        slots.load_adapter(i + 1, d)
    prompt = list(range(1, FLAGS.prompt + 1))
    for slot in range(FLAGS.rows):
        if limits:
            slots.set_adapter(slot, slot % (FLAGS.adapters + 1))
        slots.prefill(slot, prompt, 0, True, GREEDY)
    first = []
    for _ in range(3):  # compile and settle
        first.append(int(np.asarray(slots.decode().tokens)[0]))
    best = float("inf")
    for _ in range(FLAGS.reps):
        t = time.perf_counter()
        for _ in range(FLAGS.steps):
            out = slots.decode()
        jax.block_until_ready(out.tokens)
        best = min(best, (time.perf_counter() - t) / FLAGS.steps)
    return best, first


def main(argv):
    del argv
    pin_threads(FLAGS.threads)
    weights = Weights(checkpoint.random_model(BENCH_134M, seed=0))
    limits = Limits(FLAGS.adapters, FLAGS.rank, tuple(FLAGS.targets))
    extra = sum(a.size for ab in adapter.shapes(BENCH_134M, limits.targets, limits.columns)
                .values() for a in map(np.empty, ab))
    base = sum(x.size for x in jax.tree.leaves(weights.unstacked))
    print(f"stack: {FLAGS.adapters} adapters x rank {FLAGS.rank} on {','.join(limits.targets)}"
          f" = {extra / base:.1%} of the layer weights", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = save_random_adapters(tmp, BENCH_134M, FLAGS.adapters, FLAGS.rank,
                                    FLAGS.targets)
        ratios = []
        for r in range(FLAGS.rounds):
            plain, plain_first = run_side(weights, None, dirs)
            with_stack, stack_first = run_side(weights, limits, dirs)
            ratios.append(with_stack / plain)
            print(f"round {r}: plain {plain * 1e3:.1f} ms, with adapters "
                  f"{with_stack * 1e3:.1f} ms per step ({FLAGS.rows} rows): "
                  f"{plain / with_stack:.2f}x the plain throughput; base row's tokens "
                  f"{'equal' if plain_first == stack_first else 'DIFFER'}", flush=True)
    print(f"median over {FLAGS.rounds} rounds: adapters' step = {np.median(ratios):.2f}x the "
          f"plain step, throughput {1 / np.median(ratios):.2f}x")


if __name__ == "__main__":
    app.run(main)
