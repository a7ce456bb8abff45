"""The memory planner's estimates against measured peak memory on this CPU.

  python benchmarks/bench_plan.py                  # demo, BENCH_134M chat / serve / SFT / LoRA
  python benchmarks/bench_plan.py --with_7b        # + 7B-shaped checkpoints as int8 and int4,
                                                   #   a 13B-shaped one as int4
  python benchmarks/bench_plan.py --json=/tmp/plan.json

Each case runs as a child process (one CPU device) whose anonymous resident memory (RssAnon)
is sampled every 10 ms; its peak is set beside `llama2_jax.plan`'s per-device total for the
same settings (on CPU that includes the process's runtime, CPU_RUNTIME_BYTES). The planner's
goal: within 15% of each measurement, and never under it by more than 5% (an under-estimate
is an out-of-memory error).

Cases: the chat demo (one-shot answer); a random BENCH_134M checkpoint (fp32) in the chat app
(context 256, one-shot answer) and behind the server (16 slots x 1024 positions, 16
concurrent requests of 100-900 tokens); SFT and LoRA steps of the tiny (configs/sft_tiny.py)
and BENCH_134M models; with --with_7b, a LLAMA2_7B-shaped checkpoint of random bf16 weights
(written a layer at a time, 10.5 GB on disk) chatted with in int8 and in int4, and a
LLAMA2_13B-shaped one (20 GB on disk) in int4 (context 64, 8 new tokens).
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import os
import platform
import sys
import tempfile
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("XLA_FLAGS", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402

from benchmarks.memory import PeakSampler, peak_rss_anon, planned  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("with_7b", False, "Also the 7B / 13B-shaped cases (write 31 GB to --tmp).")
flags.DEFINE_string("tmp", "", "Directory for checkpoints and runs (default: a new temp dir).")
flags.DEFINE_string("json", "", "Also write every number to this JSON file.")
flags.DEFINE_string("only", "", "Comma-separated case names to run (default: all).")

TOKENIZER = os.path.join(ROOT, "tests", "data", "tokenizer.model")


def config_file(directory: str, name: str, base: str, body: str) -> str:
    """A config file `name`.py that changes configs/<base>.py with `body` (lines on `c`)."""
    path = os.path.join(directory, f"{name}.py")
    with open(path, "w") as f:
        f.write(f"import importlib.util\n\nimport ml_collections\n\n"
                f"_spec = importlib.util.spec_from_file_location('base', "
                f"{os.path.join(ROOT, 'configs', base + '.py')!r})\n"
                "_base = importlib.util.module_from_spec(_spec)\n_spec.loader.exec_module(_base)\n"
                "\n\ndef get_config():\n    c = _base.get_config()\n"
                + textwrap.indent(textwrap.dedent(body).strip(), "    ") + "\n    return c\n")
    return path


def load(path: str):
    from llama2_jax.cli import load_config_file
    return load_config_file(path)


def result(name, peak, plan, proc=None) -> dict:
    if proc is not None and proc.returncode != 0:
        raise RuntimeError(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    ratio = plan.total / peak
    row = {"case": name, "measured_bytes": peak, "planned_bytes": plan.total, "ratio": ratio,
           "within_15%": abs(ratio - 1) <= 0.15, "not_under_5%": ratio >= 0.95,
           "planned_by_kind": plan.per_device}
    print(f"{name:28s} measured {peak / 1e9:6.2f} GB  planned {plan.total / 1e9:6.2f} GB  "
          f"planned/measured {ratio:5.2f}", flush=True)
    return row


def chat_case(name, config_path, model_cfg, env=None, quantization="none", extra=(),
              timeout=600):
    config = load(config_path)
    peak, proc = peak_rss_anon(["-m", "llama2_jax.chat", "--config", config_path,
                                "--config.prompt=Count to five.", "--config.temperature=0",
                                "--config.compilation_cache_dir=", *extra], env=env,
                               timeout=timeout)
    return result(name, peak, planned(config, "chat", model_cfg, quantization), proc)


def finetune_case(name, config_path, model_cfg):
    config = load(config_path)
    # (no compilation cache: a cached step skips the compiler's memory, as the tests do)
    peak, proc = peak_rss_anon(["-m", "llama2_jax.finetune", "--config", config_path,
                                "--config.compilation_cache_dir="])
    return result(name, peak, planned(config, "finetune", model_cfg,
                                      config.quantization), proc)


def serve_case(name, config_path, model_cfg, prompts):
    import httpx

    from benchmarks.serving import ServerProcess
    config = load(config_path)
    server = ServerProcess(os.path.relpath(config_path, os.path.join(ROOT, "configs"))
                           .removesuffix(".py"))
    with PeakSampler(server.proc.pid) as sampler:
        server.wait_ready(timeout=900)
        ready = sampler.peak  # every step compiled (warm-up), no request yet

        def one(prompt):
            r = httpx.post(f"{server.url}/v1/completions", timeout=900, json={
                "model": config.model_name, "prompt": prompt, "max_tokens": 64,
                "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            list(pool.map(one, prompts))
        assert server.terminate() == 0
    row = result(name, sampler.peak, planned(config, "serve", model_cfg))
    print(f"{'':28s} peak at ready {ready / 1e9:6.2f} GB", flush=True)
    return {**row, "ready_bytes": ready}


def run() -> dict:
    import numpy as np

    from llama2_jax import demo as demo_app
    from llama2_jax.model import checkpoint
    from llama2_jax.model.config import BENCH_134M
    tmp = FLAGS.tmp or tempfile.mkdtemp(prefix="bench_plan.")
    only = set(FLAGS.only.split(",")) if FLAGS.only else None
    want = lambda name: only is None or name in only  # noqa: E731
    rows = []

    if want("demo chat"):
        demo = os.path.expanduser("~/.cache/llama2_jax/demo-v1/final")
        demo_app.train_first(os.path.join(ROOT, "configs", "sft_demo.py"), demo, sys.stderr)
        rows.append(chat_case("demo chat", os.path.join(ROOT, "configs", "demo.py"),
                              checkpoint.read_config(demo)))

    bench = os.path.join(tmp, "bench134m")
    serve_cases = tuple((f"134M serve {n}x{length}" + (" int8 KV" if kv != "none" else ""),
                         n, kv, length) for length in (1024, 4096)
                        for n, kv in ((16, "none"), (16, "int8"), (32, "int8")))
    if any(want(n) for n in ("134M chat", *(c[0] for c in serve_cases))) \
            and not os.path.isdir(bench):
        checkpoint.save(bench, checkpoint.random_model(BENCH_134M, seed=0),
                        tokenizer_path=TOKENIZER)
    if want("134M chat"):
        path = config_file(tmp, "chat134m", "demo", f"""
            c.checkpoint_dir = {bench!r}
            c.train_config = ""
            c.tokenizer_path = ""
            c.context_length = 256
            c.max_new_tokens = 32""")
        rows.append(chat_case("134M chat", path, BENCH_134M))
    for name, slots, kv, length in serve_cases:
        if not want(name):
            continue
        path = config_file(os.path.join(ROOT, "configs"), "_bench_plan_serve", "serve_demo", f"""
            c.checkpoint_dir = {bench!r}
            c.train_config = ""
            c.tokenizer_path = ""
            c.model_name = "bench"
            c.context_length = {length}
            c.max_slots = {slots}
            c.kv_quantization = {kv!r}
            c.prefill_chunk = 256
            c.prefix_cache_mb = 0""")
        try:
            rng = np.random.default_rng(0)
            prompts = [rng.integers(3, 32000, int(n)).tolist()
                       for n in rng.integers(100, 900, slots)]
            rows.append(serve_case(name, path, BENCH_134M, prompts))
        finally:
            os.remove(path)

    for model, body, cfg in (("tiny", [], None),
                             ("134M", ['c.model_preset = "bench_134m"',
                                       "c.model = ml_collections.ConfigDict()"], BENCH_134M)):
        for kind, extra in (("SFT", []), ("LoRA", ["c.lora.rank = 8"])):
            name = f"{model} {kind} step"
            if not want(name):
                continue
            lines = [f"c.output_dir = {os.path.join(tmp, 'runs', model + kind)!r}",
                     "c.steps = 4", "c.save_every = 2", "c.eval_every = 2", "c.progress = False",
                     *extra, *body]
            path = config_file(tmp, f"sft_{model}_{kind}", "sft_tiny", "\n".join(lines))
            from llama2_jax.cli import random_config
            rows.append(finetune_case(name, path, cfg or random_config(load(path))))

    for preset, method in (("7b", "int8"), ("7b", "int4"), ("13b", "int4")):
        if FLAGS.with_7b and want(f"{preset.upper()} {method} chat"):
            rows.append(big_case(tmp, preset, method))
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "machine": platform.processor() or platform.machine(), "cases": rows}


def big_case(tmp: str, preset: str, method: str) -> dict:
    """A random bf16 checkpoint of `preset`'s shape, chatted with in `method` (context 64)."""
    from llama2_jax.model.config import preset as model_preset
    directory = os.path.join(tmp, f"{preset}-bf16")
    if not os.path.isdir(directory):
        write_big(directory, preset)
    path = config_file(tmp, f"chat{preset}{method}", f"llama2_{preset}_chat", f"""
        c.checkpoint_dir = {directory!r}
        c.tokenizer_path = {TOKENIZER!r}
        c.mesh = ""
        c.quantization = {method!r}
        c.context_length = 64
        c.max_new_tokens = 8""")
    # a 2-core CPU decodes a 7B/13B model at seconds per token; int4 loads slowest
    return chat_case(f"{preset.upper()} {method} chat", path, model_preset(preset),
                     quantization=method, timeout=3600)


def write_big(directory: str, preset: str) -> None:
    """Random bf16 weights of `preset`'s shape, written a layer at a time by
    benchmarks/bench_quant.py's writer (in a child: its flags are its own)."""
    import subprocess
    subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                    "from benchmarks.bench_quant import write_7b; write_7b(*sys.argv[2:])",
                    ROOT, directory, preset], check=True, cwd=ROOT)


def main(argv):
    del argv
    out = run()
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    app.run(main)
