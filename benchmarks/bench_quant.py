"""Weight bytes, decode speed and load memory of int8 / FP8 weights.

  python benchmarks/bench_quant.py                    # BENCH_134M on CPU: none / int8 / fp8 /
                                                      # int4 weights, and an int8 KV cache
  python benchmarks/bench_quant.py --mode=memory_7b   # 7B-shaped bf16 checkpoint loaded as int8

speed: one random BENCH_134M model (fp32, as bench_inference.py), quantized each way in this one
process (`llama2_jax.quantize_model`). For each: the bytes of its parameters as stored, and
greedy decode of --new_tokens tokens after a --prompt_len prompt through `Engine.stream`,
tok/s = (n - 1) / (time of token n - time of token 1), the engine compiled first; the methods
take turns in each of --reps repetitions (order rotated), medians reported; the greedy tokens
are compared with the unquantized model's.

memory_7b: writes a LLAMA2_7B-shaped checkpoint of random bf16 weights (13.5 GB, streamed a
layer at a time with convert/orbax_io) into --workdir, then in a child process
`llama2_jax.load(dir, quantization=--quantization, dtype=--dtype)` (CPU default: float32
embeddings, norms and activations) and a
greedy generation of --gen_tokens tokens. This process samples the child's RssAnon (anonymous
memory: what the load itself holds; page cache and file mappings excluded) every
--interval_ms, and the child reports its VmHWM and load / generation times. The checkpoint is
deleted afterwards unless --keep.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "speed", ["speed", "memory_7b", "child"], "What to measure.")
flags.DEFINE_integer("reps", 3, "Repetitions (speed).")
flags.DEFINE_integer("prompt_len", 128, "Prompt tokens (speed).")
flags.DEFINE_integer("new_tokens", 128, "Tokens decoded per measurement (speed).")
flags.DEFINE_string("workdir", "/tmp/bench_quant", "Where the 7B checkpoint is written.")
flags.DEFINE_string("quantization", "int8", "Load-time quantization (memory_7b).")
flags.DEFINE_string("dtype", "", "Load dtype (memory_7b; '' = float32 on CPU).")
flags.DEFINE_integer("gen_tokens", 4, "Tokens generated after loading (memory_7b).")
flags.DEFINE_integer("interval_ms", 20, "RssAnon sampling interval (memory_7b).")
flags.DEFINE_bool("keep", False, "Keep the 7B checkpoint (memory_7b).")
flags.DEFINE_string("json", "", "Also write the results to this JSON file.")

METHODS = ("none", "int8", "fp8", "int4")
# speed: (label, weight format, KV cache format)
SETUPS = tuple((m, m, "none") for m in METHODS) + (("none + int8 KV", "none", "int8"),
                                                   ("int4 + int8 KV", "int4", "int8"))


# -- speed ---------------------------------------------------------------------------------------
def decode_tok_s(engine, prompt, n):
    from llama2_jax.inference.params import GREEDY
    stamps, tokens = [], []
    for step in engine.stream([prompt], max_new_tokens=n, params=GREEDY, stop_ids=()):
        stamps.append(time.perf_counter())
        tokens.append(step.tokens[0])
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), tokens


def run_speed() -> dict:
    import jax

    from llama2_jax.model import checkpoint, quant
    from llama2_jax.model.config import BENCH_134M
    from llama2_jax.inference.generate import Engine
    model = checkpoint.random_model(BENCH_134M, seed=0)
    prompt = np.random.default_rng(0).integers(3, BENCH_134M.vocab_size,
                                               FLAGS.prompt_len).tolist()
    engines, out = {}, {}
    for m, weights, kv in SETUPS:
        qmodel = quant.quantize_model(model, weights)
        engines[m] = Engine(qmodel, kv_quantization=kv)
        t = time.perf_counter()
        _, tokens = decode_tok_s(engines[m], prompt, FLAGS.new_tokens)  # compiles
        out[m] = {"weight_bytes": quant.weight_bytes(qmodel),
                  "layer_weight_bytes": sum(x.nbytes for x in jax.tree.leaves(
                      checkpoint.params_of(qmodel)["layers"])),
                  "warmup_s": time.perf_counter() - t, "tokens": tokens, "tok_s": [],
                  "unstacked": engines[m].weights.per_layer}
    labels = [m for m, _, _ in SETUPS]
    for rep in range(FLAGS.reps):
        order = labels[rep % len(labels):] + labels[:rep % len(labels)]
        for m in order:
            tok_s, tokens = decode_tok_s(engines[m], prompt, FLAGS.new_tokens)
            out[m]["tok_s"].append(tok_s)
            print(f"rep {rep + 1}/{FLAGS.reps} {m:14s} {tok_s:6.1f} tok/s", flush=True)
    base = out["none"]
    for m in labels:
        r = out[m]
        r["decode_tok_s"] = statistics.median(r["tok_s"])
        r["speed_vs_none"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["bytes_vs_none"] = r["weight_bytes"] / base["weight_bytes"]
        agree = 0
        for a, b in zip(r["tokens"], base["tokens"]):
            if a != b:
                break
            agree += 1
        r["greedy_leading_equal"] = agree
    for m in labels:
        del out[m]["tokens"]
    print("\n| weights | bytes of parameters | vs none | decode tok/s (median of %d) | vs none | "
          "leading greedy tokens equal to none's |" % FLAGS.reps)
    print("|---|---:|---:|---:|---:|---:|")
    for m in labels:
        r = out[m]
        print(f"| {m} | {r['weight_bytes'] / 1e6:.1f} MB | {r['bytes_vs_none']:.3f}x | "
              f"{r['decode_tok_s']:.1f} | {r['speed_vs_none']:.2f}x | "
              f"{r['greedy_leading_equal']}/{FLAGS.new_tokens} |")
    return {"mode": "speed", "model": "BENCH_134M fp32 (random)", "results": out,
            "loadavg_after": os.getloadavg()}


# -- memory --------------------------------------------------------------------------------------
def write_7b(directory: str, preset: str = "7b") -> float:
    """A random bf16 checkpoint of LLAMA2_7B's shape (or `preset`'s), written a layer at a
    time; returns seconds."""
    from convert import mapping
    from convert.orbax_io import Streamed, write_params
    from llama2_jax.model import checkpoint
    from llama2_jax.model.config import preset as model_preset
    t = time.perf_counter()
    cfg = model_preset(preset).with_dtype("bfloat16")
    rng = np.random.default_rng(0)
    bf16 = np.dtype("bfloat16")
    blocks: dict = {}

    def rand(shape, norm, i):
        """Layer i: one random block per shape, rolled by i (drawing 6.7B normals is slow)."""
        if norm:
            return np.ones(shape, bf16)
        if shape not in blocks:
            blocks[shape] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(bf16)
        return np.roll(blocks[shape], i or 0, axis=0)

    tree: dict = {}
    for path, stacked in mapping.param_paths():
        shape = mapping.jax_shape(path, cfg)
        norm = path[-1] == "weight"
        full = (cfg.n_layers, *shape) if stacked else shape
        mapping.set_path(tree, path, Streamed(full, bf16,
                                              lambda i, s=shape, n=norm: rand(s, n, i), stacked))
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_params(os.path.join(tmp, checkpoint.PARAMS_DIR), tree)
    checkpoint.write_config(tmp, cfg)
    os.rename(tmp, directory)
    return time.perf_counter() - t


def _status(pid="self") -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def run_child() -> None:
    """Load the 7B checkpoint quantized and generate; prints one JSON line."""
    import jax

    import llama2_jax
    from llama2_jax.model import quant
    directory = os.path.join(FLAGS.workdir, "7b")
    t = time.perf_counter()
    model = llama2_jax.load(directory, quantization=FLAGS.quantization,
                            dtype=FLAGS.dtype or None)
    jax.block_until_ready(jax.tree.leaves(llama2_jax.model.checkpoint.params_of(model)))
    load_s = time.perf_counter() - t
    after_load = _status()
    t = time.perf_counter()
    [tokens] = llama2_jax.generate(model, [[1, 450, 11148, 3304, 338]], temperature=0,
                                   max_new_tokens=FLAGS.gen_tokens, stop_ids=[])
    gen_s = time.perf_counter() - t
    print(json.dumps({"load_s": load_s, "generate_s": gen_s, "tokens": tokens,
                      "weight_bytes": quant.weight_bytes(model), "after_load": after_load,
                      "end": _status(), "backend": jax.default_backend()}), flush=True)


def run_memory() -> dict:
    directory = os.path.join(FLAGS.workdir, "7b")
    os.makedirs(FLAGS.workdir, exist_ok=True)
    write_s = None
    if not os.path.isdir(directory):
        write_s = write_7b(directory)
        print(f"wrote {directory} in {write_s:.0f} s", flush=True)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory)
               for f in fs)
    subprocess.run(["sync"])
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:  # cold read, as after a reboot
            f.write("1\n")
    except OSError:
        pass  # not root, or a read-only /proc: page cache is not anonymous memory anyway
    cmd = [sys.executable, os.path.abspath(__file__), "--mode=child",
           f"--workdir={FLAGS.workdir}", f"--quantization={FLAGS.quantization}",
           f"--gen_tokens={FLAGS.gen_tokens}", f"--dtype={FLAGS.dtype}"]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
    peak = 0
    while child.poll() is None:
        try:
            peak = max(peak, _status(child.pid)["RssAnon"])
        except (FileNotFoundError, KeyError, ProcessLookupError):
            pass
        time.sleep(FLAGS.interval_ms / 1e3)
    lines = [line for line in child.stdout.read().splitlines() if line.startswith("{")]
    if child.returncode or not lines:
        raise SystemExit(f"child failed with code {child.returncode}")
    res = json.loads(lines[-1])
    res.update({"checkpoint_bytes": size, "peak_rss_anon": peak, "write_s": write_s,
                "quantization": FLAGS.quantization, "dtype": FLAGS.dtype or "float32",
                "command": " ".join(cmd)})
    print(f"7B bf16 checkpoint ({size / 1e9:.2f} GB on disk) loaded as {FLAGS.quantization}: "
          f"weights {res['weight_bytes'] / 1e9:.2f} GB, peak RssAnon {peak / 1e9:.2f} GB "
          f"(VmHWM {res['end']['VmHWM'] / 1e9:.2f} GB), load {res['load_s']:.0f} s, "
          f"{FLAGS.gen_tokens} tokens {res['generate_s']:.0f} s: {res['tokens']}")
    if not FLAGS.keep:
        shutil.rmtree(directory)
    return {"mode": "memory_7b", "results": res}


def main(argv):
    del argv
    if FLAGS.mode == "child":
        return run_child()
    out = run_speed() if FLAGS.mode == "speed" else run_memory()
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    app.run(main)
