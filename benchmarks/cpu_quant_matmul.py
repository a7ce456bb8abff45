"""Quantized matmuls on XLA:CPU: the whole weight converted before its dot (what XLA:CPU does
with `x @ q.astype(float32)`, and int4's fused forms for accelerators) against a chunk of the
weight at a time in a loop (llama2_jax.model.cpu_matmul, what the model runs on CPU).

  python benchmarks/cpu_quant_matmul.py                  # one 7B layer's seven matmuls
  python benchmarks/cpu_quant_matmul.py --rows=1,16 --reps=5

For int8 and int4 codes of one LLAMA2_7B layer (wq, wk, wv, wo 4096 x 4096; w1, w3 4096 x 11008;
w2 11008 x 4096; random codes and scales) and the same layer in float32: the time of the seven
products at each row count (median of --reps, the forms taking turns), and each jitted
function's temporaries by XLA:CPU's own memory_analysis(). Also the scanned 7B chat steps'
temporaries (abstract weights, one CPU device, nothing allocated). Ratios only travel between
machines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llama2_jax import aot  # noqa: E402
from llama2_jax.model import cpu_matmul, int4, quant, sharding  # noqa: E402
from llama2_jax.model.config import LLAMA2_7B  # noqa: E402

D, F = LLAMA2_7B.dim, LLAMA2_7B.ffn_dim
SHAPES = {"wq": (D, D), "wk": (D, D), "wv": (D, D), "wo": (D, D), "w1": (D, F), "w3": (D, F),
          "w2": (F, D)}


def layer(method: str, rng) -> dict:
    """One layer's weights: float32 arrays, or QArrays of random codes (the values do not
    matter to speed; quantizing 200M random floats would take minutes)."""
    out = {}
    for name, (n_in, n_out) in SHAPES.items():
        if method == "fp32":
            out[name] = jnp.asarray(rng.standard_normal((n_in, n_out), np.float32) * 0.02)
        elif method == "int8":
            out[name] = quant.QArray(jnp.asarray(rng.integers(-127, 128, (n_in, n_out), np.int8)),
                                     jnp.asarray(rng.random(n_out, np.float32) * 1e-3))
        else:
            g = int4.group_size(n_in)
            q = rng.integers(0, 256, (n_in // g, g // 2, n_out), np.uint8)
            out[name] = quant.QArray(jnp.asarray(q), jnp.asarray(
                rng.random((n_in // g, n_out), np.float32) * 1e-3), group=g, in_axes=1)
    return out


def whole(x, w):
    """The weight converted whole, then one dot (int4: its accelerator forms)."""
    if not isinstance(w, quant.QArray):
        return x @ w
    if w.group:
        return int4.fused_matmul(x, w.q, w.scale)
    return (x @ w.q.astype(x.dtype)) * w.scale


def chunked(x, w):
    if not isinstance(w, quant.QArray):
        return x @ w
    if w.group:
        return int4.chunked_matmul(x, w.q, w.scale)
    return cpu_matmul.eight_bit(x, w.q) * w.scale


def seven(matmul):
    def f(x, h, ws):  # x [rows, D], h [rows, F]: a sum keeps every product
        return sum(jnp.sum(matmul(h if n == "w2" else x, ws[n])) for n in SHAPES)
    return jax.jit(f)


def step_temporaries() -> list[str]:
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    lines = []
    for q in ("none", "int8", "int4"):
        for r in aot.serve_steps(LLAMA2_7B.with_dtype("float32"), mesh, slots=1, length=64,
                                 quantization=q, unstack=False, cost=False,
                                 kinds=("decode", "prefill")):
            lines.append(f"| {q} | {r.name} | {r.args_bytes / 1e9:.2f} GB | "
                         f"{r.temp_bytes / 1e9:.3f} GB |")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,16,256")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no_steps", action="store_true", help="skip the 7B step compiles")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print("| weights | rows | form | ms per layer (median) | vs fp32 | temporaries |")
    print("|---|---:|---|---:|---:|---:|")
    weights = {m: layer(m, rng) for m in ("fp32", "int8", "int4")}
    for rows in (int(r) for r in args.rows.split(",")):
        x = jnp.asarray(rng.standard_normal((rows, D), np.float32))
        h = jnp.asarray(rng.standard_normal((rows, F), np.float32))
        cases = [("fp32", "dense", seven(whole))] + [
            (m, form, seven(fn)) for m in ("int8", "int4")
            for form, fn in (("whole", whole), ("chunked", chunked))]
        times = {(m, form): [] for m, form, _ in cases}
        temps = {}
        for m, form, f in cases:
            compiled = f.lower(x, h, weights[m]).compile()
            temps[m, form] = compiled.memory_analysis().temp_size_in_bytes
            f(x, h, weights[m]).block_until_ready()
        for rep in range(args.reps):
            for m, form, f in cases[rep % len(cases):] + cases[:rep % len(cases)]:
                t = time.perf_counter()
                f(x, h, weights[m]).block_until_ready()
                times[m, form].append(time.perf_counter() - t)
        base = statistics.median(times["fp32", "dense"])
        for m, form, _ in cases:
            t = statistics.median(times[m, form])
            print(f"| {m} | {rows} | {form} | {t * 1e3:.1f} | {base / t:.2f}x | "
                  f"{temps[m, form] / 1e6:.0f} MB |", flush=True)
    if not args.no_steps:
        print("\n| 7B weights | scanned chat step (64 positions) | arguments | temporaries |")
        print("|---|---|---:|---:|")
        print("\n".join(step_temporaries()))


if __name__ == "__main__":
    main()
