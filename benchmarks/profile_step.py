"""Where a decode step's time goes on this CPU: the server's own step (Slots.decode, the
BENCH_134M fp32 model, log-probabilities on as the server runs them), at 1 and 16 rows,
greedy and sampled, beside the bare matmul chain of the same weights.

  python benchmarks/profile_step.py                       # rows 1,16; greedy and top_p
  python benchmarks/profile_step.py --rows=16 --sampling=top_p --steps=30 --top=25

For each case:
  step ms       wall time per step the way the server's device loop runs it (dispatch, then
                read the tokens back before the next step), median over --steps
  pipelined ms  the next step dispatched before the previous tokens are read (what async
                scheduling would give), median
  ops           XLA:CPU's per-op trace (`jax.profiler.trace` with
                `--xla_cpu_enable_xprof_traceme=true`): every op's time summed over threads
                and steps, attributed to the source line that made it (the compiled HLO's
                metadata) and grouped: weight matmuls, attention, KV-cache write, norms and
                RoPE, sampling, log-probabilities, slot state, other
  chain ms      the same weights' matmul chain alone (benchmarks/matmul_chain.py's, no
                attention or sampling), compiled with the same options: the floor under the step
  --xla_defaults  both compiled with XLA:CPU's default library fusions (before 72f916d)
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_enable_xprof_traceme=true").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import pin_threads  # noqa: E402
from benchmarks.matmul_chain import chain  # noqa: E402
from llama2_jax.inference.params import SamplingParams  # noqa: E402
from llama2_jax.inference.slots import Slots  # noqa: E402
from llama2_jax.inference.weights import DEFAULT_OPTIONS, EngineOptions, Weights  # noqa: E402
from llama2_jax.model import checkpoint  # noqa: E402
from llama2_jax.model.config import BENCH_134M  # noqa: E402

SAMPLING = {"greedy": SamplingParams(temperature=0.0, top_p=1.0),
            "top_p": SamplingParams(temperature=0.6, top_p=0.9)}
# (group, pattern on "file:function op_name") in order: the first match names an op's group
GROUPS = [
    ("log-probabilities", r"sampling\.py.*logprobs|logsumexp.*_out|_out"),
    ("sampling", r"sampling\.py"),
    ("KV-cache write", r"kv_cache\.py.*(write|update|scatter)"),
    ("attention", r"kv_cache\.py|attention|^\? dot f32\[\d+(,\d+){2,}\]"),
    ("weight matmuls", r"dot_general|einsum|linear|quant\.py|^\? dot f32\[\d+,(768|2048|2304|"
                       r"4096|32000)\]"),
    ("norms, RoPE", r"rms|norm|rope|rotary"),
    ("slot state", r"slots\.py"),
]
INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = .*?metadata=\{op_name="([^"]*)"'
                         r'(?: stack_frame_id=(\d+))?')


PLAIN = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (\S+) (\w+)\(')


def op_sources(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> 'file:function:line op_name' from the compiled module's metadata
    (its stack frame tables: the innermost frame in this package names the source)."""
    tables, section = collections.defaultdict(dict), None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        m = re.match(r'^(\d+) (.*)$', line) if section else None
        if m:
            tables[section][m.group(1)] = m.group(2)
        elif not line.strip() or line.startswith(("%", "ENTRY", "HloModule")):
            section = None if line.startswith(("%", "ENTRY")) else section

    def field(entry, name):
        return re.search(rf"{name}=(\d+)", entry).group(1)

    def frame_text(frame_id):
        seen = set()
        while frame_id and frame_id not in seen and frame_id in tables["StackFrames"]:
            seen.add(frame_id)
            entry = tables["StackFrames"][frame_id]
            loc = tables["FileLocations"][field(entry, "file_location_id")]
            path = tables["FileNames"][field(loc, "file_name_id")].strip('"')
            if "llama2_jax" in path:
                fn = tables["FunctionNames"][field(loc, "function_name_id")].strip('"')
                return f"{os.path.basename(path)}:{fn}:{field(loc, 'line')}"
            frame_id = field(entry, "parent_frame_id")
        return "?"

    out = {}
    for line in hlo_text.splitlines():
        m = INSTRUCTION.match(line)
        if m:
            out[m.group(1)] = f"{frame_text(m.group(3))} {m.group(2).split('/')[-1]}"
            continue
        m = PLAIN.match(line)  # no metadata (some passes drop it): the opcode and shape
        if m:
            out[m.group(1)] = f"? {m.group(3)} {m.group(2)}"
    return out


def group_of(source: str) -> str:
    for name, pattern in GROUPS:
        if re.search(pattern, source):
            return name
    return "other"


def trace_ops(run, steps: int) -> dict[str, float]:
    """Per-op microseconds summed over threads and `steps` calls of run()."""
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                run()
        path = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)[0]
        events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total = collections.Counter()
    for e in events:
        args = e.get("args") or {}
        # control flow (cond, while) encloses the ops it runs, which have their own events
        if e.get("ph") == "X" and "hlo_op" in args and not e["name"].startswith("end:") \
                and not re.match(r"(cond|while|conditional|call)\b", args["hlo_op"]):
            total[(args.get("hlo_module", ""), args["hlo_op"])] += e.get("dur", 0.0)
    return total


def chain_ms(params, rows: int, compiler_options, reps: int = 20) -> float:
    """The step's weight matmuls alone (q/k/v/o, w1/w3/w2 per layer, the output matrix)."""
    layers = params["layers"]
    ws = [np.asarray(layers["attention"][k]).reshape(BENCH_134M.n_layers, BENCH_134M.dim, -1)
          for k in ("wq", "wk", "wv")]
    wo = np.asarray(layers["attention"]["wo"]).reshape(BENCH_134M.n_layers, -1, BENCH_134M.dim)
    ff = [np.asarray(layers["feed_forward"][k]) for k in ("w1", "w3", "w2")]
    flat = [[jnp.asarray(w[i]) for w in (*ws, wo, *ff)] for i in range(BENCH_134M.n_layers)]
    out = jnp.asarray(np.asarray(params["output"]))

    run = jax.jit(lambda x, layers, o: chain(x, layers, o, jax.nn.silu),
                  compiler_options=compiler_options)
    x = jnp.ones((rows, BENCH_134M.dim), jnp.float32)
    jax.block_until_ready(run(x, flat, out))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(run(x, flat, out))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def case(model, rows: int, sampling: str, steps: int, top: int, prompt: int,
         length: int, options: EngineOptions) -> dict:
    slots = Slots(Weights(model, options=options), rows, length)
    rng = np.random.default_rng(0)
    for s in range(rows):
        tokens = rng.integers(3, BENCH_134M.vocab_size, prompt).tolist()
        for start in range(0, prompt, slots.chunk):
            part = tokens[start:start + slots.chunk]
            slots.prefill(s, part, start, start + len(part) == prompt, SAMPLING[sampling])

    def step():
        np.asarray(slots.decode().tokens)  # the device loop reads each step's tokens

    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    pending = slots.decode()
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = slots.decode()
        np.asarray(pending.tokens)
        pending = nxt
    np.asarray(pending.tokens)
    pipelined = (time.perf_counter() - t0) / steps
    ops = trace_ops(step, steps)
    # names of the decode step's ops, from its compiled module (same shapes as those run)
    sources = {}
    for name, lowered in slots.lower_steps(every=True):
        if name.startswith(f"decode {rows} rows"):
            sources.update(op_sources(
                lowered.compile().runtime_executable().hlo_modules()[0].to_string()))
    groups, lines, unknown = collections.Counter(), collections.Counter(), 0.0
    for (module, op), us in ops.items():
        if "decode" not in module:
            continue
        src = sources.get(op)
        if src is None:
            unknown += us
            src = f"? {op}"
        groups[group_of(src)] += us
        lines[f"[{group_of(src)}] {op} <- {src[:100]}"] += us
    return dict(rows=rows, sampling=sampling, step_ms=1e3 * statistics.median(times),
                pipelined_ms=1e3 * pipelined,
                op_ms_per_step={k: v / 1e3 / steps for k, v in groups.most_common()},
                unattributed_ms=unknown / 1e3 / steps,
                top_ops=[(k, v / 1e3 / steps) for k, v in lines.most_common(top)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,16")
    ap.add_argument("--sampling", default="greedy,top_p")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--top", type=int, default=15, help="ops listed per case")
    ap.add_argument("--prompt", type=int, default=128, help="tokens in each row's prompt")
    ap.add_argument("--length", type=int, default=640, help="positions per slot")
    ap.add_argument("--json", default="")
    ap.add_argument("--xla_defaults", action="store_true",
                    help="compile with XLA:CPU's default library fusions (no "
                         "EngineOptions.cpu_compiler_options), as before 72f916d")
    args = ap.parse_args()
    options = EngineOptions(cpu_compiler_options=()) if args.xla_defaults else DEFAULT_OPTIONS
    pin_threads(os.cpu_count())
    model = checkpoint.random_model(BENCH_134M, seed=0)
    params = checkpoint.params_of(model)
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        floor = chain_ms(params, rows, dict(options.cpu_compiler_options))
        for sampling in args.sampling.split(","):
            r = case(model, rows, sampling, args.steps, args.top, args.prompt, args.length,
                     options)
            r["chain_ms"] = floor
            results.append(r)
            print(f"\n## {rows} rows, {sampling}: step {r['step_ms']:.1f} ms, pipelined "
                  f"{r['pipelined_ms']:.1f} ms, matmul chain {floor:.1f} ms "
                  f"(step = {r['step_ms'] / floor:.2f}x chain)")
            total = sum(r["op_ms_per_step"].values())
            print(f"op time summed over threads: {total:.1f} ms/step "
                  f"({r['unattributed_ms']:.1f} ms unattributed)")
            for k, v in r["op_ms_per_step"].items():
                print(f"  {k:20s} {v:7.2f} ms  {100 * v / total:4.0f}%")
            for k, v in r["top_ops"]:
                print(f"    {v:6.2f} ms  {k}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
