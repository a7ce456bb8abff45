"""Inference speed of llama2_jax next to Hugging Face transformers (PyTorch), same weights.

  python benchmarks/bench_inference.py                        # CPU: BENCH_134M, fp32, batch 1
  python benchmarks/bench_inference.py --threads=1 --json=/tmp/inference.json
  python benchmarks/bench_inference.py --gpu                  # accelerator: 7B bf16, no HF

CPU mode builds one random BENCH_134M model (dim 768, 12 layers, 12 heads, FFN 2048, vocab
32000, fp32), copies its weights into a `LlamaForCausalLM` (convert/mapping.py, the HF q/k
permutation included) and measures both in this one process, alternating which goes first in
each repetition so that drift of a shared machine hits both alike; medians over `--reps`.

What is measured, for both sides the same way:
  prefill   one forward over the 128-token prompt that fills the KV cache and picks the next
            token (HF: `model(ids, use_cache=True, logits_to_keep=1)`, the call `generate`
            makes; ours: `Slots.prefill` of the one slot `Engine.stream` uses).
            tok/s = prompt tokens / seconds.
  decode    greedy generation of `--new_tokens` tokens through each side's public API, no EOS
            stop (ours: `Engine.stream`; HF: `model.generate(do_sample=False, min_new_tokens=
            max_new_tokens, eos_token_id=None)` with KV cache, timed by a streamer that stamps
            every token). tok/s = (n - 1) / (time of token n - time of token 1): the decode
            steps only, prefill excluded. Host-side overheads of each API are included.
  step      one decode step in isolation (ours: `Slots.decode` + block_until_ready; HF: a
            forward of one token with `past_key_values`), median over `--steps`.
  TTFT      call to first new token. Warm: compiled engine, used HF model. Cold, ours: a fresh
            `Engine` (traces and compiles the cache maker, prefill and decode: `stream`
            dispatches decode before it hands out the first token). Cold, HF: the first
            `generate` of the process (torch has no compile step; its one-time start-up costs
            fall on that call).
  compiles  `Engine.compile_count` of the engine used for every warm measurement, at the end:
            prompt bucketing and a fixed cache length mean it stays at 2 (prefill + decode).

Threads: `torch.set_num_threads(--threads)`; XLA:CPU sizes its thread pool from the CPUs the
process may run on, so for fewer threads than CPUs the process is pinned to the first
`--threads` CPUs (os.sched_setaffinity, before JAX starts its CPU client).

The memory-bound line divides the bytes of fp32 weights read per decoded token by the copy
bandwidth of a numpy array (read + written bytes / time).

llama.cpp (`--llama_cpp`, on by default): after the sides above, the same weights as an F32
GGUF, decoded by `llama-bench -p 0 -n <new_tokens> -d <prompt_len> -r <reps> -t <threads>`
(batch 1, tokens generated after a prompt's worth of KV cache, as ours; its mean over the reps;
its defaults otherwise: F16 KV cache, `--llama_cpp_args=-ctk,f32,-ctv,f32` for F32) from the
llama.cpp that llama-cpp-python 0.3.36 vendors, built once and cached by
benchmarks/llama_cpp_peer.py. Without cmake / a compiler, or when the build fails, the column
says why it was skipped.

GPU mode (`--gpu`): LLAMA2_7B in bfloat16 with random weights (checkpoint.random_model), batch-1
decode tok/s and the fraction of the device's copy bandwidth it reaches (weight bytes per token
/ seconds per token / bandwidth of a jitted `a + 1` over a 4 GiB array, read + written), and
decode throughput at batch 16 and 64.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402  (JAX starts its CPU client on first use, after pin_threads)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import llama_cpp_peer  # noqa: E402
from benchmarks.common import pin_threads, hf_model_from, median  # noqa: E402
from llama2_jax.model import fused  # noqa: E402
from llama2_jax.model.checkpoint import params_of, random_model  # noqa: E402
from llama2_jax.model.config import BENCH_134M, LLAMA2_7B  # noqa: E402
from llama2_jax.inference.generate import Engine  # noqa: E402
from llama2_jax.model.transformer import linear, param_count  # noqa: E402
from llama2_jax.inference.params import GREEDY  # noqa: E402
from llama2_jax.inference.buckets import pow2_at_least  # noqa: E402
from llama2_jax.inference.generate import MIN_LENGTH  # noqa: E402
from flax import nnx  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("threads", os.cpu_count(), "CPU threads for torch and XLA:CPU.")
flags.DEFINE_integer("reps", 3, "Repetitions of every measurement; medians are reported.")
flags.DEFINE_integer("prompt_len", 128, "Prompt tokens.")
flags.DEFINE_integer("new_tokens", 128, "Tokens generated per decode measurement.")
flags.DEFINE_integer("steps", 32, "Isolated decode steps timed per repetition.")
flags.DEFINE_integer("seed", 0, "Seed of the random weights and prompt.")
flags.DEFINE_string("json", "", "Also write every number to this JSON file.")
flags.DEFINE_list("cache_lengths", [], "Also time llama2_jax's isolated decode step with caches "
                  "of these many slots (e.g. 256,1024,4096: the chat Session's default is the "
                  "model's max_seq_len).")
flags.DEFINE_bool("gpu", False, "7B bf16 on the accelerator instead of the CPU comparison.")
flags.DEFINE_bool("llama_cpp", True, "Also measure llama.cpp's batch-1 decode (llama-bench) of "
                  "the same weights; built on first use (benchmarks/llama_cpp_peer.py).")
flags.DEFINE_list("llama_cpp_args", [], "More llama-bench arguments, e.g. -ctk,f32,-ctv,f32 "
                  "(an F32 KV cache as ours; llama.cpp's default is F16).")

GOAL_VS_HF = 2.5
TOKENIZER = os.path.join(ROOT, "tests", "data", "tokenizer.model")  # a file, not an import


class OthersBusy:
    """Share of the machine's CPU time that other processes used between start() and stop().

    The benchmark is only as good as the quiet around it; this says how quiet it was.
    """

    def start(self):
        self.t0, self.self0 = self._system_busy(), self._own()
        return self

    def stop(self) -> float:
        t1, own1 = self._system_busy(), self._own()
        busy, total = t1[0] - self.t0[0], t1[1] - self.t0[1]
        if total <= 0:
            return float("nan")
        ticks = os.sysconf("SC_CLK_TCK")
        others = busy / ticks - (own1 - self.self0)
        return max(0.0, others / (total / ticks))

    @staticmethod
    def _system_busy():
        with open("/proc/stat") as f:
            # user nice system idle iowait irq softirq steal (guest time is inside user/nice)
            fields = [int(x) for x in f.readline().split()[1:9]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    @staticmethod
    def _own() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime


def copy_bandwidth(nbytes: int, reps: int = 5) -> float:
    """numpy copy of an fp32 array: (read + written bytes) / seconds, best of `reps`."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best


# -- llama2_jax ----------------------------------------------------------------------------------
class Ours:
    name = "llama2_jax"

    def __init__(self, model, prompt, new_tokens):
        self.model, self.prompt, self.n = model, prompt, new_tokens
        self.engine = Engine(model)  # every warm measurement; its compile_count is reported
        self.cache_len = None

    def _stream(self, engine):
        """(tokens, seconds to token 1, stamp of every token) of one greedy generation."""
        tokens, stamps = [], []
        t0 = time.perf_counter()
        for step in engine.stream([self.prompt], max_new_tokens=self.n, params=GREEDY,
                                  stop_ids=()):
            stamps.append(time.perf_counter())
            tokens.append(step.tokens[0])
        self.cache_len = min(pow2_at_least(len(self.prompt) + self.n, MIN_LENGTH),
                             engine.config.max_seq_len)  # the slot length `stream` chose
        return tokens, stamps[0] - t0, stamps

    def warm_up(self) -> None:
        """Compile the measured engine: one untimed generation."""
        self._stream(self.engine)

    def cold_ttft(self) -> float:
        """Seconds to the first token of a fresh Engine, compilation included."""
        engine = Engine(self.model)
        t0 = time.perf_counter()
        steps = engine.stream([self.prompt], max_new_tokens=self.n, params=GREEDY, stop_ids=())
        next(steps)
        ttft = time.perf_counter() - t0
        steps.close()
        return ttft

    def _slot(self, length: int | None = None):
        """The engine's one-slot Slots of `length` (what `stream` steps), the slot free."""
        slots = self.engine.slots(1, length or self.cache_len or MIN_LENGTH)
        slots.release(0)
        return slots

    def prefill(self) -> float:
        slots = self._slot()
        t0 = time.perf_counter()
        jax.block_until_ready(slots.prefill(0, self.prompt, 0, True, GREEDY).tokens)
        dt = time.perf_counter() - t0
        slots.release(0)
        self.last_logits = self.engine.forward(self.prompt)[-1]
        return dt

    def generate(self):
        return self._stream(self.engine)

    def step_times(self, n: int, length: int | None = None) -> list[float]:
        slots = self._slot(length)
        jax.block_until_ready(slots.prefill(0, self.prompt, 0, True, GREEDY).tokens)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            jax.block_until_ready(slots.decode().tokens)
            times.append(time.perf_counter() - t0)
        slots.release(0)
        return times


# -- Hugging Face --------------------------------------------------------------------------------
class _Stamps:
    """A `generate` streamer: `put` gets the prompt, then every new token as it is chosen."""

    def __init__(self):
        self.stamps = []

    def put(self, value):
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


class HF:
    name = "transformers"

    def __init__(self, model, prompt, new_tokens):
        import torch
        self.model, self.n = model, new_tokens
        self.ids = torch.as_tensor([prompt])

    def _generate(self):
        import torch
        clock = _Stamps()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(self.ids, do_sample=False, max_new_tokens=self.n,
                                      min_new_tokens=self.n, eos_token_id=None, pad_token_id=0,
                                      streamer=clock)
        tokens = out[0, self.ids.shape[1]:].tolist()
        assert len(tokens) == self.n and len(clock.stamps) == self.n + 1
        return tokens, clock.stamps[1] - t0, clock.stamps[1:]

    def cold_ttft(self) -> float:
        return self._generate()[1]

    def prefill(self) -> float:
        import torch
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(self.ids, use_cache=True, logits_to_keep=1)
            out.logits[:, -1].argmax(-1)
            dt = time.perf_counter() - t0
        self.last_logits = out.logits[0, -1].numpy()
        return dt

    def generate(self):
        return self._generate()

    def step_times(self, n: int) -> list[float]:
        import torch
        times = []
        with torch.inference_mode():
            out = self.model(self.ids, use_cache=True, logits_to_keep=1)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(n):
                t0 = time.perf_counter()
                out = self.model(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                times.append(time.perf_counter() - t0)
        return times


# -- the decode step next to its bare matmuls ----------------------------------------------------
def matmul_chain(engine: Engine):
    """A jitted chain of the model's own weight matmuls at batch 1, in the decode step's order
    and layout (q/k/v and w1/w3 fused where the engine's per-layer copies are; through the
    CPU matmul kernel where they are packed, llama2_jax.model.packed), and nothing
    else (no attention, norms, RoPE, sampling): what a decode step cannot beat."""
    cfg = engine.config
    layers = [jax.tree.map(lambda a: a, nnx.to_pure_dict(s)) for s in engine.weights.unstacked]
    params = nnx.to_pure_dict(engine.weights.state)
    d, n, k, h = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def mm(x, w):  # as the steps multiply: plain arrays by XLA, packed ones by the kernel
        return linear("BD,DQ->BQ", x, w)

    def chain(x, layers, embed_out):
        for w in layers:
            a, f = w["attention"], w["feed_forward"]
            if isinstance(a["wq"], fused.FusedQKV):  # the steps' layout: one matmul each
                q, kk, v = jnp.split(mm(x, a["wq"].w), [n * h, (n + k) * h], axis=-1)
                gate, up = jnp.split(mm(x, f["w1"].w), 2, axis=-1)
                kv = kk + v
            else:
                q = mm(x, a["wq"].reshape(d, n * h))
                kv = mm(x, a["wk"].reshape(d, k * h)) + mm(x, a["wv"].reshape(d, k * h))
                gate, up = mm(x, f["w1"]), mm(x, f["w3"])
            mix = q + jnp.repeat(kv.reshape(1, k, h), n // k, axis=1).reshape(1, n * h)
            x = x + mm(mix, a["wo"].reshape(n * h, d))
            x = x + mm(jax.nn.silu(gate) * up, f["w2"])
        return jnp.argmax(mm(x, embed_out), axis=-1)

    run = jax.jit(chain, compiler_options=engine.weights.compiler_options)  # as the steps
    x = jnp.ones((1, d), cfg.compute_dtype)
    return lambda: run(x, layers, params["output"])


def decode_vs_chain(model, prompt, reps: int, steps: int) -> dict:
    """Batch-1 decode step of the one stepper (Slots, one slot of prompt + new tokens: what
    `generate`, the chat and the server run) next to the bare matmul chain; alternating, best
    and median step of each."""
    from llama2_jax.inference.slots import Slots
    engine = Engine(model)
    length = bucket_up(len(prompt) + FLAGS.new_tokens)
    slots = Slots(engine.weights, 1, length)
    chain = matmul_chain(engine)
    times = {"slots_step": [], "chain": []}
    for _ in range(reps):
        slots.release(0)
        slots.prefill(0, prompt, 0, True, GREEDY)
        for name in times:
            run = (lambda: slots.decode().tokens) if name == "slots_step" else chain
            jax.block_until_ready(run())
            for _ in range(steps):
                t = time.perf_counter()
                jax.block_until_ready(run())
                times[name].append(time.perf_counter() - t)
    out = {f"{k}_ms": 1e3 * median(v) for k, v in times.items()}
    out.update({f"{k}_best_ms": 1e3 * min(v) for k, v in times.items()})
    out["slot_length"], out["kv_block"] = length, slots.shapes.kv_block
    return out


def sampled_vs_greedy(model, reps: int, steps: int) -> dict:
    """The decode step of 1 and 16 rows (a 16-slot Slots, prompts of 64 tokens) with greedy
    rows, Meta's sampling (0.6 / 0.9) and top-k 40 on top; the settings alternate per
    repetition. Median ms per step and the ratio to greedy."""
    from llama2_jax.inference.slots import Slots
    from llama2_jax.inference.params import SamplingParams
    from llama2_jax.inference.weights import Weights
    slots = Slots(Weights(model), 16, 512)  # the server's weights (not fused)
    rng = np.random.default_rng(1)
    prompts = rng.integers(3, model.config.vocab_size, (16, 64)).tolist()
    settings = {"greedy": GREEDY, "top_p 0.9": SamplingParams(0.6, 0.9, 0, seed=1),
                "top_p 0.9, top_k 40": SamplingParams(0.6, 0.9, 40, seed=1)}
    out = {}
    for rows in (1, 16):
        times = {name: [] for name in settings}
        for _ in range(reps):
            for name, params in settings.items():
                for slot in range(16):
                    slots.release(slot)
                for slot in range(rows):
                    slots.prefill(slot, prompts[slot], 0, True, params)
                jax.block_until_ready(slots.decode().tokens)
                for _ in range(steps):
                    t = time.perf_counter()
                    jax.block_until_ready(slots.decode().tokens)
                    times[name].append(time.perf_counter() - t)
        greedy = median(times["greedy"])
        out[rows] = {name: {"step_ms": 1e3 * median(v), "vs_greedy": median(v) / greedy}
                     for name, v in times.items()}
    return out


def bucket_up(n: int) -> int:
    size = 16
    while size < n:
        size *= 2
    return size


# -- CPU comparison ------------------------------------------------------------------------------
def measure(side, r: dict, cold: bool) -> None:
    busy = OthersBusy().start()
    if cold:
        r["ttft_cold_s"].append(side.cold_ttft())
    tokens, ttft, stamps = side.generate()
    r["tokens"] = tokens
    r["ttft_warm_s"].append(ttft)
    r["decode_tok_s"].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    r["prefill_s"].append(median([side.prefill() for _ in range(3)]))
    r["step_s"].append(median(side.step_times(FLAGS.steps)))
    r["others_busy"].append(busy.stop())


def llama_cpp_decode(params: dict, cfg) -> dict:
    """llama-bench's batch-1 decode of `params` (an F32 GGUF), or {"skipped": why not}."""
    try:
        binaries = llama_cpp_peer.build()
        with tempfile.TemporaryDirectory() as tmp:
            gguf = llama_cpp_peer.write_gguf(params, cfg, TOKENIZER,
                                             os.path.join(tmp, "bench-f32.gguf"))
            r = llama_cpp_peer.bench_decode(gguf, FLAGS.threads, n_gen=FLAGS.new_tokens,
                                            depth=FLAGS.prompt_len, reps=FLAGS.reps,
                                            binaries=binaries, extra_args=FLAGS.llama_cpp_args)
        print(f"llama.cpp  decode {r['tok_s']:6.1f} tok/s (llama-bench, mean of {r['reps']})",
              flush=True)
        return r
    except llama_cpp_peer.PeerUnavailable as e:
        print(f"llama.cpp column skipped: {e}", flush=True)
        return {"skipped": str(e)}


def run_cpu() -> dict:
    pin_threads(FLAGS.threads)
    import torch
    import transformers

    torch.set_num_threads(FLAGS.threads)
    cfg = BENCH_134M
    load_before = os.getloadavg()
    model = random_model(cfg, seed=FLAGS.seed)
    n_params = param_count(model)
    weight_bytes = n_params * np.dtype(cfg.param_dtype).itemsize
    params = jax.tree.map(np.asarray, params_of(model))
    hf = hf_model_from(params, cfg)
    prompt = np.random.default_rng(FLAGS.seed).integers(3, cfg.vocab_size,
                                                        FLAGS.prompt_len).tolist()
    sides = [Ours(model, prompt, FLAGS.new_tokens), HF(hf, prompt, FLAGS.new_tokens)]
    sides[0].warm_up()
    keys = ("ttft_cold_s", "ttft_warm_s", "decode_tok_s", "prefill_s", "step_s", "others_busy")
    res = {s.name: {k: [] for k in keys} for s in sides}
    for rep in range(FLAGS.reps):
        for side in (sides if rep % 2 == 0 else sides[::-1]):
            t = time.perf_counter()
            # HF's cold start happens once per process; ours again in every fresh Engine.
            measure(side, res[side.name], cold=side.name == Ours.name or rep == 0)
            print(f"rep {rep + 1}/{FLAGS.reps} {side.name:12s} decode "
                  f"{res[side.name]['decode_tok_s'][-1]:6.1f} tok/s  "
                  f"({time.perf_counter() - t:.0f} s, other processes "
                  f"{100 * res[side.name]['others_busy'][-1]:.0f}% of the CPUs)", flush=True)
    compiles = sides[0].engine.compile_count  # after every rep: no recompiles if still 2
    by_length = {}
    for length in map(int, FLAGS.cache_lengths):  # compiles a decode step per length
        sides[0].step_times(2, length)
        by_length[length] = 1e3 * median(sides[0].step_times(FLAGS.steps, length))
    ours, theirs = res[Ours.name], res[HF.name]
    agree = 0
    for a, b in zip(ours["tokens"], theirs["tokens"]):
        if a != b:
            break
        agree += 1
    logit_diff = float(np.max(np.abs(sides[0].last_logits - sides[1].last_logits)))
    bw_1g = copy_bandwidth(1 << 30)
    bw_w = copy_bandwidth(weight_bytes)
    summary = {}
    for name, r in res.items():
        summary[name] = {
            "prefill_tok_s": FLAGS.prompt_len / median(r["prefill_s"]),
            "decode_tok_s": median(r["decode_tok_s"]),
            "step_ms": 1e3 * median(r["step_s"]),
            "ttft_warm_ms": 1e3 * median(r["ttft_warm_s"]),
            "ttft_cold_ms": 1e3 * median(r["ttft_cold_s"]),
        }
    summary[Ours.name]["compile_count"] = compiles
    summary[Ours.name]["step_ms_by_cache_length"] = by_length
    summary["decode_vs_chain"] = decode_vs_chain(model, prompt, FLAGS.reps, FLAGS.steps)
    summary["sampled_vs_greedy"] = sampled_vs_greedy(model, FLAGS.reps, FLAGS.steps)
    llama_cpp = (llama_cpp_decode(params, cfg) if FLAGS.llama_cpp
                 else {"skipped": "--nollama_cpp"})
    return {
        "mode": "cpu",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "machine": {"cpu": _cpu_name(), "cpus": os.cpu_count(), "threads": FLAGS.threads,
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "python": platform.python_version(), "jax": jax.__version__,
                    "torch": torch.__version__, "transformers": transformers.__version__},
        "model": {"preset": "BENCH_134M", "params": n_params, "weight_bytes": weight_bytes,
                  "dtype": cfg.dtype, "batch": 1, "prompt_len": FLAGS.prompt_len,
                  "new_tokens": FLAGS.new_tokens, "cache_len": sides[0].cache_len},
        "reps": FLAGS.reps,
        "raw": res,
        "summary": summary,
        "greedy_agreement": {"leading_equal": agree, "of": FLAGS.new_tokens,
                             "prefill_logits_max_abs_diff": logit_diff},
        "memory": {"numpy_copy_1GiB_GB_s": bw_1g / 1e9,
                   "numpy_copy_weight_size_GB_s": bw_w / 1e9,
                   "decode_bound_tok_s": bw_1g / weight_bytes},
        "llama_cpp": llama_cpp,  # llama_cpp_peer.bench_decode's dict, or {"skipped": why}
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cpu_table(out: dict) -> str:
    o, h = out["summary"][Ours.name], out["summary"][HF.name]
    m = out["model"]
    lc = out["llama_cpp"].get("tok_s")  # None: skipped
    rows = [
        ("prefill tok/s, %d-token prompt (higher is better)" % m["prompt_len"], "prefill_tok_s",
         "%.0f", ""),
        ("decode tok/s, %d new tokens, greedy (higher is better)" % m["new_tokens"],
         "decode_tok_s", "%.1f", f"{lc:.1f} ({o['decode_tok_s'] / lc:.2f}x)" if lc else ""),
        ("decode step in isolation, ms (lower is better)", "step_ms", "%.1f",
         f"{1e3 / lc:.1f} (per token)" if lc else ""),
        ("time to first token, warm, ms", "ttft_warm_ms", "%.0f", ""),
        ("time to first token, cold, ms (ours: fresh Engine, compiles)", "ttft_cold_ms", "%.0f",
         ""),
    ]
    lines = ["| metric | llama2_jax | transformers | llama2_jax / transformers | "
             "llama.cpp F32, llama-bench (llama2_jax / llama.cpp) |", "|---|---:|---:|---:|---:|"]
    for label, key, fmt, ref in rows:
        lines.append(f"| {label} | {fmt % o[key]} | {fmt % h[key]} | "
                     f"{o[key] / h[key]:.2f}x | {ref} |")
    lines.append(f"| compiles (prefill + decode traces) | {o['compile_count']} | n/a | | |")
    for length, ms in o["step_ms_by_cache_length"].items():
        lines.append(f"| decode step in isolation, KV cache of {length} slots, ms | {ms:.1f} "
                     "| | | |")
    c = out["summary"]["decode_vs_chain"]
    lines += ["", "| batch-1 step, same weights, alternating (median / best ms) | ms | "
              "chain / step |", "|---|---:|---:|"]
    for key, label in (("chain", "bare jitted chain of the model's matmuls (no attention, "
                                 "norms, sampling)"),
                       ("slots_step", f"decode step (Slots, 1 slot of "
                                      f"{c['slot_length']}, blocks of {c['kv_block']}: "
                                      "generate, chat and server)")):
        lines.append(f"| {label} | {c[key + '_ms']:.1f} / {c[key + '_best_ms']:.1f} | "
                     f"{c['chain_ms'] / c[key + '_ms']:.0%} |")
    sv = out["summary"]["sampled_vs_greedy"]
    lines += ["", "| decode step, 16-slot Slots (median ms; x greedy) | 1 row | 16 rows |",
              "|---|---:|---:|"]
    for name in sv["1"] if "1" in sv else sv[1]:
        one, many = (sv.get(str(r)) or sv[r] for r in (1, 16))
        lines.append(f"| {name} | {one[name]['step_ms']:.1f} ({one[name]['vs_greedy']:.2f}x) | "
                     f"{many[name]['step_ms']:.1f} ({many[name]['vs_greedy']:.2f}x) |")
    dec = o["decode_tok_s"]
    mem = out["memory"]
    busy = [b for r in out["raw"].values() for b in r["others_busy"]]
    busy_mean, busy_max = sum(busy) / len(busy), max(busy)
    agree = out["greedy_agreement"]
    notes = [
        "",
        f"- goal decode >= {GOAL_VS_HF}x transformers: {dec / h['decode_tok_s']:.2f}x "
        f"({'met' if dec >= GOAL_VS_HF * h['decode_tok_s'] else 'NOT met'}); "
        + (f"goal >= llama.cpp F32 decode ({lc:.1f} tok/s, same run): {dec:.1f} tok/s, "
           f"{dec / lc:.2f}x ({'met' if dec >= lc else 'NOT met'})" if lc else
           f"llama.cpp column skipped: {out['llama_cpp']['skipped']}"),
        f"- memory: numpy copy {mem['numpy_copy_1GiB_GB_s']:.1f} GB/s (1 GiB, read + written), "
        f"{mem['numpy_copy_weight_size_GB_s']:.1f} GB/s at the weights' size; "
        f"{m['weight_bytes'] / 1e9:.3f} GB of weights per token -> "
        f"~{mem['decode_bound_tok_s']:.0f} tok/s if every weight byte came from DRAM",
        f"- greedy tokens equal for the first {agree['leading_equal']} of {agree['of']}; "
        f"prefill last-position logits max |diff| {agree['prefill_logits_max_abs_diff']:.2e}",
        f"- {m['params'] / 1e6:.1f}M params, {m['dtype']}, batch {m['batch']}, KV cache "
        f"{m['cache_len']} slots; {out['machine']['threads']} threads (torch.set_num_threads; "
        f"XLA:CPU on {out['machine']['threads']} of {out['machine']['cpus']} CPUs); medians of "
        f"{out['reps']} reps, sides alternating; other processes used "
        f"{100 * busy_mean:.0f}% of the CPUs on average during the measurements (worst rep "
        f"{100 * busy_max:.0f}%)",
    ]
    if lc:
        r = out["llama_cpp"]
        fa = {-1: "auto", 0: "off", 1: "on"}.get(r.get("flash_attn"), "?")
        notes.append(f"- llama.cpp: `{r['command']}`: {lc:.1f} ± {r['stddev_tok_s']:.1f} tok/s "
                     f"(llama-bench's mean ± stddev of {r['reps']} runs; KV cache "
                     f"{r.get('type_k', '?')}/{r.get('type_v', '?')}, flash attention {fa})")
    return "\n".join(lines + notes)


# -- accelerator ---------------------------------------------------------------------------------
def run_gpu() -> dict:
    if jax.default_backend() == "cpu":
        raise SystemExit("--gpu needs an accelerator; jax sees only the CPU")
    cfg = LLAMA2_7B.with_dtype("bfloat16")
    a = jnp.ones((1 << 30,), jnp.float32)  # 4 GiB
    copy = jax.jit(lambda x: x + 1)
    jax.block_until_ready(copy(a))
    times = []
    for _ in range(10):
        t = time.perf_counter()
        jax.block_until_ready(copy(a))
        times.append(time.perf_counter() - t)
    bandwidth = 2 * a.nbytes / min(times)
    del a
    model = random_model(cfg, seed=FLAGS.seed)
    weight_bytes = param_count(model) * np.dtype(cfg.param_dtype).itemsize
    engine = Engine(model)
    rng = np.random.default_rng(FLAGS.seed)
    results = {}
    for batch in (1, 16, 64):
        prompts = rng.integers(3, cfg.vocab_size, (batch, FLAGS.prompt_len)).tolist()
        rates = []
        for rep in range(FLAGS.reps + 1):  # the first run compiles for this batch size
            stamps = []
            for _ in engine.stream(prompts, max_new_tokens=FLAGS.new_tokens, params=GREEDY,
                                   stop_ids=()):
                stamps.append(time.perf_counter())
            if rep:
                rates.append(batch * (len(stamps) - 1) / (stamps[-1] - stamps[0]))
        results[batch] = median(rates)
    per_token = 1 / results[1]
    return {
        "mode": "gpu",
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(jax.devices()[0].device_kind),
        "model": {"preset": "LLAMA2_7B", "dtype": "bfloat16", "weight_bytes": weight_bytes,
                  "prompt_len": FLAGS.prompt_len, "new_tokens": FLAGS.new_tokens},
        "copy_bandwidth_GB_s": bandwidth / 1e9,
        "decode_tok_s": {str(b): r for b, r in results.items()},
        "batch1_weight_GB_s": weight_bytes / per_token / 1e9,
        "batch1_fraction_of_copy_bandwidth": weight_bytes / per_token / bandwidth,
        "compile_count": engine.compile_count,
    }


def gpu_table(out: dict) -> str:
    d = out["decode_tok_s"]
    return "\n".join([
        f"LLAMA2_7B bf16 on {out['device']}, copy bandwidth {out['copy_bandwidth_GB_s']:.0f} GB/s",
        "| batch | decode tok/s (all rows) |", "|---:|---:|",
        *(f"| {b} | {r:.1f} |" for b, r in d.items()),
        "",
        f"- batch 1: {out['batch1_weight_GB_s']:.0f} GB/s of weights read = "
        f"{100 * out['batch1_fraction_of_copy_bandwidth']:.0f}% of the copy bandwidth; "
        f"compiles: {out['compile_count']}",
    ])


def main(argv):
    del argv
    out = run_gpu() if FLAGS.gpu else run_cpu()
    print()
    print(f"`python {out['command']}` on {out['date']}")
    print()
    print(gpu_table(out) if FLAGS.gpu else cpu_table(out))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"\nwrote {FLAGS.json}")


if __name__ == "__main__":
    app.run(main)
