"""The server under concurrent streaming clients, next to transformers' continuous batching.

  python benchmarks/bench_serve.py                          # CPU: BENCH_134M fp32, 1/4/16/64
  python benchmarks/bench_serve.py --concurrency=1,16 --json=/tmp/serve.json

One random BENCH_134M model (fp32) is saved as a checkpoint and served by a
`python -m llama2_jax.serve` subprocess on 127.0.0.1 (max_slots = the largest concurrency,
context = longest prompt + new tokens, prefix cache off, every step compiled at start). The
same weights go into a transformers `LlamaForCausalLM` in this process. The sides run one
after the other on the same prompts, so each has the machine to itself:

  ours      `concurrency` closed-loop clients (asyncio + httpx, in this process), each sending
            its next streaming `/v1/completions` request (token-id prompt, `--sampling`, exactly
            `new_tokens` tokens: `ignore_eos`, `return_token_ids`) when its previous one ends.
            Every token is stamped when its SSE chunk arrives.
  hf        transformers' own continuous batching (`init_continuous_batching`, paged cache,
            FIFO scheduler, eager torch) driven the same closed-loop way in-process
            (benchmarks/serve_peers.py): no HTTP on that side.
  generate  this project's `llama2_jax.generate` at batch 1, one prompt after the other (no
            server): the baseline for one client.

For each: output tok/s = output tokens / (first submit -> last token), time to first token
(submit -> first token) and inter-token latency (gaps between consecutive tokens of one
request) p50/p95. Then a `mixed` phase: `--mixed_requests` requests from 16 clients with random
prompt lengths, max_tokens, temperature / top_p / top_k / seed, streamed or not, a few
disconnecting early; the server's compile count (`llama2_jax_compiles` in /metrics) before and
after every phase says whether anything compiled after warm-up. Greedy tokens of ours are
compared with HF's and generate's request by request.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import platform
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# One CPU device in this process (tests.conftest, imported with tests.serving, would ask for 8
# simulated ones: `generate` would then run sharded 8 ways on this machine's cores).
os.environ.setdefault("XLA_FLAGS", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import httpx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.common import hf_model_from, pin_threads  # noqa: E402
from benchmarks.serve_peers import hf_continuous_batching  # noqa: E402
from llama2_jax.model import checkpoint  # noqa: E402
from llama2_jax import generate  # noqa: E402
from llama2_jax.model.config import BENCH_134M  # noqa: E402
from llama2_jax.inference.buckets import Shapes  # noqa: E402
from benchmarks.serving import ServerProcess  # noqa: E402

FLAGS = flags.FLAGS
SAMPLING = {"greedy": dict(temperature=0), "top_p": dict(temperature=0.6, top_p=0.9),
            "top_p_top_k": dict(temperature=0.6, top_p=0.9, top_k=40)}
flags.DEFINE_list("concurrency", ["1", "4", "16", "64"], "Concurrent clients, one run each.")
flags.DEFINE_integer("new_tokens", 128, "Tokens generated per request (greedy, EOS ignored).")
flags.DEFINE_integer("min_prompt", 16, "Shortest prompt, tokens.")
flags.DEFINE_integer("max_prompt", 512, "Longest prompt, tokens.")
flags.DEFINE_integer("requests_per_client", 2, "Requests per run = this x concurrency ...")
flags.DEFINE_integer("min_requests", 8, "... but at least this many.")
flags.DEFINE_integer("mixed_requests", 200, "Requests of the mixed phase (0 = skip it).")
flags.DEFINE_integer("prefill_chunk", 256, "The server's prefill_chunk.")
flags.DEFINE_list("sides", ["ours", "hf", "generate"], "What to run.")
flags.DEFINE_enum("sampling", "greedy", list(SAMPLING),
                  "Our requests' settings: greedy, Meta's chat defaults (temperature 0.6, top_p "
                  "0.9), or those and top_k 40 (each request seeded by its index).")
flags.DEFINE_integer("threads", os.cpu_count(), "CPU threads (torch; XLA via affinity).")
flags.DEFINE_integer("seed", 0, "Seed of the weights and prompts.")
flags.DEFINE_string("json", "", "Also write every number to this JSON file.")

MODEL = "bench"


def percentile(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def summary(r: dict) -> dict:
    return dict(tok_s=r["tok_s"], wall_s=r["wall_s"], requests=len(r["tokens"]),
                output_tokens=r["output_tokens"],
                ttft_p50_ms=1e3 * percentile(r["ttft_s"], 50),
                ttft_p95_ms=1e3 * percentile(r["ttft_s"], 95),
                itl_p50_ms=1e3 * percentile(r["itl_s"], 50),
                itl_p95_ms=1e3 * percentile(r["itl_s"], 95))


# -- our server: closed-loop streaming clients over HTTP --------------------------------------
async def _stream_one(client: httpx.AsyncClient, url: str, body: dict):
    """(submit time, token stamps, token ids) of one streamed completion."""
    submit = time.perf_counter()
    stamps, tokens = [], []
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            now = time.perf_counter()
            for choice in chunk["choices"]:
                ids = choice.get("token_ids") or []
                tokens += ids
                stamps += [now] * len(ids)
    return submit, stamps, tokens


async def _closed_loop(url: str, prompts, new_tokens: int, concurrency: int) -> dict:
    todo = list(enumerate(prompts))[::-1]
    results = {}

    async def client_loop(client):
        while todo:
            i, p = todo.pop()
            body = dict(model=MODEL, prompt=p, max_tokens=new_tokens, stream=True,
                        ignore_eos=True, return_token_ids=True, seed=i,
                        **SAMPLING[FLAGS.sampling])
            results[i] = await _stream_one(client, url, body)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    order = range(len(prompts))
    submit = [results[i][0] for i in order]
    stamps = [results[i][1] for i in order]
    tokens = [results[i][2] for i in order]
    wall = max(s[-1] for s in stamps) - min(submit)
    out = sum(len(t) for t in tokens)
    return dict(wall_s=wall, output_tokens=out, tok_s=out / wall, tokens=tokens,
                ttft_s=[s[0] - t for s, t in zip(stamps, submit)],
                itl_s=[b - a for s in stamps for a, b in zip(s, s[1:])])


def serve_run(server: ServerProcess, prompts, new_tokens: int, concurrency: int) -> dict:
    url = server.url + "/v1/completions"
    asyncio.run(_closed_loop(url, prompts[:1], 2, 1))  # one untimed request, as HF's warm-up
    return asyncio.run(_closed_loop(url, prompts, new_tokens, concurrency))


async def _mixed(url: str, n: int, vocab: int, context: int, seed: int) -> dict:
    """`n` requests with random settings from 16 clients; some disconnect early."""
    rng = random.Random(seed)
    counts = dict(ok=0, streamed=0, disconnected=0, errors=0)
    jobs = []
    for _ in range(n):
        length = rng.randint(1, min(FLAGS.max_prompt, context - 33))
        greedy = rng.random() < 0.3
        jobs.append(dict(
            model=MODEL, prompt=[rng.randrange(3, vocab) for _ in range(length)],
            max_tokens=rng.randint(1, 32), temperature=0 if greedy else rng.uniform(0.1, 1.5),
            top_p=rng.choice([1.0, 0.9, 0.5]), top_k=rng.choice([0, 0, 5, 40]),
            seed=rng.randrange(1 << 31), stream=rng.random() < 0.7,
            logprobs=rng.choice([None, None, 0, 3])))
    jobs.reverse()

    async def client_loop(client):
        while jobs:
            body = jobs.pop()
            try:
                if body["stream"]:
                    counts["streamed"] += 1
                    leave = rng.random() < 0.15
                    async with client.stream("POST", url, json=body) as r:
                        assert r.status_code == 200, r.status_code
                        async for line in r.aiter_lines():
                            if leave and line.startswith("data: {"):
                                counts["disconnected"] += 1
                                break
                else:
                    r = await client.post(url, json=body)
                    assert r.status_code == 200, (r.status_code, r.text[:300])
                counts["ok"] += 1
            except Exception as e:  # noqa: BLE001 -- counted and reported
                counts["errors"] += 1
                print(f"mixed request failed: {type(e).__name__}: {e}", file=sys.stderr)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(16)))
    counts["wall_s"] = time.perf_counter() - t0
    return counts


# -- the script ------------------------------------------------------------------------------
def make_prompts(rng, n: int) -> list[list[int]]:
    lengths = rng.integers(FLAGS.min_prompt, FLAGS.max_prompt + 1, n)
    return [rng.integers(3, BENCH_134M.vocab_size, int(k)).tolist() for k in lengths]


def first_divergence(a, b) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run() -> dict:
    levels = [int(c) for c in FLAGS.concurrency]
    new = FLAGS.new_tokens
    context = FLAGS.max_prompt + new
    rng = np.random.default_rng(FLAGS.seed)
    prompt_sets = {c: make_prompts(rng, max(FLAGS.min_requests, FLAGS.requests_per_client * c))
                   for c in levels}
    model = checkpoint.random_model(BENCH_134M, seed=FLAGS.seed)
    assert len(jax.devices()) == 1, "one CPU device expected (XLA_FLAGS)"
    out = dict(levels={}, config=dict(
        model="BENCH_134M fp32 (random weights)", new_tokens=new, context=context,
        prompts=f"{FLAGS.min_prompt}-{FLAGS.max_prompt} tokens, uniform",
        max_slots=max(levels), prefill_chunk=FLAGS.prefill_chunk, threads=FLAGS.threads,
        sampling=FLAGS.sampling,
        jax=jax.__version__, python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")))
    for c in levels:
        out["levels"][c] = {}

    if "ours" in FLAGS.sides:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, MODEL)
            checkpoint.save(path, model, tokenizer_path=os.path.join(ROOT, "tests", "data",
                                                                     "tokenizer.model"))
            t0 = time.perf_counter()
            server = ServerProcess(
                checkpoint_dir=path, train_config="", model_name=MODEL, dtype="float32",
                context_length=context, max_slots=max(levels), max_queue=1024,
                prefill_chunk=FLAGS.prefill_chunk, prefix_cache_mb=0)
            try:
                server.wait_ready(timeout=1800)
                out["server_start_s"] = time.perf_counter() - t0
                out["compiles_at_ready"] = server.metric("llama2_jax_compiles")
                out["server_rss_gb"] = server.rss_bytes() / 1e9
                print(f"server ready in {out['server_start_s']:.0f} s, "
                      f"{out['compiles_at_ready']:.0f} compiled steps", flush=True)
                for c in levels:
                    r = serve_run(server, prompt_sets[c], new, c)
                    out["levels"][c]["ours"] = summary(r)
                    out["levels"][c]["ours_tokens"] = r["tokens"]
                    print(f"ours       {c:3d} clients: {r['tok_s']:7.1f} tok/s", flush=True)
                out["compiles_after_runs"] = server.metric("llama2_jax_compiles")
                if FLAGS.mixed_requests:
                    m = asyncio.run(_mixed(server.url + "/v1/completions", FLAGS.mixed_requests,
                                           BENCH_134M.vocab_size, context, FLAGS.seed))
                    m["compiles_after"] = server.metric("llama2_jax_compiles")
                    m["active_slots_after"] = server.metric("llama2_jax_active_slots")
                    m["queue_after"] = server.metric("llama2_jax_queue_depth")
                    out["mixed"] = m
                    print(f"mixed: {m}", flush=True)
                out["server_rss_gb_end"] = server.rss_bytes() / 1e9
            finally:
                code = server.terminate()
                out["server_exit"] = code

    if "generate" in FLAGS.sides:
        prompts = prompt_sets[min(levels)]
        chunks = Shapes.make(1, BENCH_134M.max_seq_len)  # a prompt's prefill buckets
        warm = {chunks.bucket(len(p)): p for p in prompts}
        for p in warm.values():  # the steps of every prompt bucket compiled before the timing
            generate(model, [p], max_new_tokens=new, temperature=0, stop_ids=())
        stamps, submit, tokens = [], [], []
        for p in prompts:
            submit.append(time.perf_counter())
            tokens.append(generate(model, [p], max_new_tokens=new, temperature=0,
                                   stop_ids=())[0])
            stamps.append(time.perf_counter())
        n = sum(len(t) for t in tokens)
        wall = stamps[-1] - submit[0]
        out["generate"] = dict(tok_s=n / wall, wall_s=wall, output_tokens=n,
                               requests=len(prompts), concurrency=min(levels))
        out["generate_tokens"] = tokens
        print(f"generate batch 1 loop: {n / wall:7.1f} tok/s", flush=True)

    if "hf" in FLAGS.sides:
        from jax.tree_util import tree_map
        hf = hf_model_from(tree_map(np.asarray, checkpoint.params_of(model)), BENCH_134M)
        for c in levels:
            r = hf_continuous_batching(hf, prompt_sets[c], new, c, threads=FLAGS.threads)
            out["levels"][c]["hf"] = summary(r)
            out["levels"][c]["hf_tokens"] = r["tokens"]
            print(f"hf         {c:3d} clients: {r['tok_s']:7.1f} tok/s", flush=True)
        del hf

    # token agreement (greedy requests only: sampled ones draw from other generators)
    for c in levels if FLAGS.sampling == "greedy" else []:
        lv = out["levels"][c]
        if "ours_tokens" in lv and "hf_tokens" in lv:
            pairs = list(zip(lv["ours_tokens"], lv["hf_tokens"]))
            lv["equal_to_hf"] = sum(a == b for a, b in pairs)
            lv["first_divergence_from_hf"] = [first_divergence(a, b) for a, b in pairs]
        if c == min(levels) and "ours_tokens" in lv and "generate_tokens" in out:
            lv["equal_to_generate"] = sum(
                a == b for a, b in zip(lv["ours_tokens"], out["generate_tokens"]))
    return out


def table(out: dict) -> str:
    rows = ["| clients | requests | side | output tok/s | TTFT p50 / p95 ms | ITL p50 / p95 ms "
            "| ours / HF |", "|---:|---:|---|---:|---:|---:|---:|"]
    for c, lv in out["levels"].items():
        for side in ("ours", "hf"):
            if side not in lv:
                continue
            s = lv[side]
            ratio = ""
            if side == "ours" and "hf" in lv:
                ratio = f"**{s['tok_s'] / lv['hf']['tok_s']:.2f}x**"
            rows.append(f"| {c} | {s['requests']} | {side} | {s['tok_s']:.1f} | "
                        f"{s['ttft_p50_ms']:.0f} / {s['ttft_p95_ms']:.0f} | "
                        f"{s['itl_p50_ms']:.1f} / {s['itl_p95_ms']:.1f} | {ratio} |")
    lines = ["\n".join(rows)]
    g = out.get("generate")
    if g:
        one = out["levels"].get(g["concurrency"], {}).get("ours")
        lines.append(f"generate at batch 1, {g['requests']} prompts one after another: "
                     f"{g['tok_s']:.1f} tok/s" + (f"; server at {g['concurrency']} client(s) / "
                                                  f"generate = {one['tok_s'] / g['tok_s']:.2f}x"
                                                  if one else ""))
    for c, lv in out["levels"].items():
        if "equal_to_hf" in lv:
            lines.append(f"{c} clients: {lv['equal_to_hf']}/{len(lv['first_divergence_from_hf'])}"
                         f" requests' greedy tokens equal to HF's; first divergences "
                         f"{lv['first_divergence_from_hf']}")
        if "equal_to_generate" in lv:
            lines.append(f"{c} clients: {lv['equal_to_generate']} requests equal to generate's")
    if "compiles_at_ready" in out:
        lines.append(f"compiles: {out['compiles_at_ready']:.0f} at ready, "
                     f"{out['compiles_after_runs']:.0f} after the runs"
                     + (f", {out['mixed']['compiles_after']:.0f} after {FLAGS.mixed_requests} "
                        f"mixed requests ({out['mixed']})" if "mixed" in out else ""))
        lines.append(f"server start {out['server_start_s']:.0f} s; RSS {out['server_rss_gb']:.2f}"
                     f" GB at ready, {out['server_rss_gb_end']:.2f} GB at the end; exit "
                     f"{out['server_exit']}")
    return "\n\n".join(lines)


def main(argv):
    del argv
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)
    pin_threads(FLAGS.threads)
    out = run()
    print(table(out))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    app.run(main)
