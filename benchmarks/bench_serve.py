"""The server under concurrent streaming clients, next to transformers' continuous batching
and llama.cpp's server.

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
  llama_cpp llama.cpp's `llama-server` (benchmarks/llama_cpp_peer.py: built once from the sources
            llama-cpp-python 0.3.36 vendors, cached) on an F32 GGUF of the same weights,
            `-np` = the level's clients (restarted per level; `--llama_cpp_slots=max`: one server
            with -np = the largest level, as ours), `-c` = np x context, `--threads`, no prompt
            cache, its defaults otherwise (F16 KV cache, flash attention on: greedy tokens part
            from ours at near-ties; `--llama_cpp_args=-fa,off,-ctk,f32,-ctv,f32` to change
            them). The same closed-loop clients and prompts, to its `/v1/completions`: the
            same sampling (temperature -> top-k -> top-p only), `ignore_eos`, streamed. Without
            cmake / a compiler, or when the build fails, the column is skipped with the reason.

  features  (`--features`) ours again on the same prompts, with the server features of issue 20
            switched on: every even request JSON-constrained (`response_format` json_schema:
            an object whose one string is too long to close within `new_tokens`, so every
            request still runs its `new_tokens` steps with a grammar mask in each), every odd
            one with presence / frequency / repetition penalties, a logit bias and min_p. Its
            ratio to the plain run is the features' cost.
  adapters  (`--adapters=4`) a second server with that many random LoRA adapters (rank
            `--adapter_rank` on `--adapter_targets`; max_loras = their count), run twice on the
            same prompts: `adapter server, base` (every request the base: the fixed cost of
            the room for adapters, paid by every step) and `adapters + features` (request i
            names adapter i % (n + 1), 0 the base, with the features above).

For each: output tok/s = output tokens / (first submit -> last token), time to first token
(submit -> first token) and inter-token latency (gaps between consecutive tokens of one
request) p50/p95. Then a `mixed` phase: `--mixed_requests` requests from 16 clients with random
prompt lengths, max_tokens, temperature / top_p / top_k / seed, streamed or not, a few
disconnecting early; the server's compile count (`llama2_jax_compiles` in /metrics) before and
after every phase says whether anything compiled after warm-up. Greedy tokens of ours are
compared with HF's, generate's and llama.cpp's request by request.
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

from benchmarks import llama_cpp_peer  # noqa: E402
from benchmarks.common import hf_model_from, pin_threads, save_random_adapters  # noqa: E402
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
flags.DEFINE_enum("kv_quantization", "none", ["none", "int8", "fp8"],
                  "Our server's KV cache (none: float32; llama-server's default is F16, its "
                  "-ctk/-ctv go in --llama_cpp_args).")
flags.DEFINE_list("sides", ["ours", "hf", "generate", "llama_cpp"], "What to run.")
flags.DEFINE_enum("llama_cpp_slots", "level", ["level", "max"],
                  "llama-server's -np: each level's clients (a server per level), or the "
                  "largest level for all (one server, as ours).")
flags.DEFINE_list("llama_cpp_args", [], "More llama-server arguments, e.g. -ctk,f32,-ctv,f32 "
                  "(an F32 KV cache as ours; llama.cpp's default is F16).")
flags.DEFINE_enum("sampling", "greedy", list(SAMPLING),
                  "Our requests' settings: greedy, Meta's chat defaults (temperature 0.6, top_p "
                  "0.9), or those and top_k 40 (each request seeded by its index).")
flags.DEFINE_bool("features", False, "Also run ours with structured output and penalties "
                  "on (see the docstring).")
flags.DEFINE_integer("adapters", 0, "LoRA adapters of a second server run (0 = skip).")
flags.DEFINE_integer("adapter_rank", 16, "Their rank (= the server's max_lora_rank).")
flags.DEFINE_list("adapter_targets", ["wq", "wk", "wv", "wo", "w1", "w2", "w3"],
                  "The weights they adapt.")
flags.DEFINE_integer("threads", os.cpu_count(), "CPU threads (torch; XLA via affinity).")
flags.DEFINE_integer("seed", 0, "Seed of the weights and prompts.")
flags.DEFINE_string("json", "", "Also write every number to this JSON file.")

MODEL = "bench"
# A JSON answer that cannot end within new_tokens (each token holds at most a few characters).
LONG_JSON = {"type": "object", "properties": {"text": {"type": "string", "minLength": 4000}},
             "required": ["text"], "additionalProperties": False}
TOKENIZER = os.path.join(ROOT, "tests", "data", "tokenizer.model")  # a file, not an import


def percentile(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def summary(r: dict) -> dict:
    return dict(tok_s=r["tok_s"], wall_s=r["wall_s"], requests=len(r["tokens"]),
                output_tokens=r["output_tokens"],
                ttft_p50_ms=1e3 * percentile(r["ttft_s"], 50),
                ttft_p95_ms=1e3 * percentile(r["ttft_s"], 95),
                itl_p50_ms=1e3 * percentile(r["itl_s"], 50),
                itl_p95_ms=1e3 * percentile(r["itl_s"], 95))


# -- a server (ours or llama-server): closed-loop streaming clients over HTTP ----------------
def request_body(side: str, i: int, prompt: list[int], new_tokens: int) -> dict:
    """Request `i`: exactly `new_tokens` tokens after the token-id `prompt`, `--sampling`
    seeded by `i`, streamed with every token's id."""
    if side == "llama_cpp":
        return llama_cpp_peer.request_body(prompt, new_tokens, i, SAMPLING[FLAGS.sampling])
    body = dict(model=MODEL, prompt=prompt, max_tokens=new_tokens, stream=True,
                ignore_eos=True, return_token_ids=True, seed=i, **SAMPLING[FLAGS.sampling])
    if side == "adapters":
        body["model"] = MODEL if i % (FLAGS.adapters + 1) == 0 else \
            f"adapter{i % (FLAGS.adapters + 1)}"
    if side in ("features", "adapters") and i % 2 == 0:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "long", "schema": LONG_JSON}}
    elif side in ("features", "adapters"):
        body.update(frequency_penalty=0.5, presence_penalty=0.3, repetition_penalty=1.1,
                    logit_bias={"13": -5, "29871": 2}, min_p=0.05)
    return body


async def _stream_one(client: httpx.AsyncClient, url: str, body: dict):
    """(submit time, token stamps, token ids) of one streamed completion. Our server's chunks
    carry `token_ids`; llama-server's one token id and the count so far in `__verbose`
    (`verbose` in llama_cpp_peer.request_body). A token llama-server holds back (the first
    bytes of a UTF-8 character) arrives with the next chunk, its id unknown: None."""
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
            if "__verbose" in chunk:  # llama-server
                n = chunk["__verbose"]["tokens_predicted"] - len(tokens)
                ids = (chunk["__verbose"].get("tokens") or [])[-n:] if n > 0 else []
                tokens += [None] * (n - len(ids)) + ids
                stamps += [now] * max(n, 0)
                continue
            for choice in chunk["choices"]:
                ids = choice.get("token_ids") or []
                tokens += ids
                stamps += [now] * len(ids)
    return submit, stamps, tokens


async def _closed_loop(url: str, prompts, new_tokens: int, concurrency: int,
                       side: str) -> dict:
    todo = list(enumerate(prompts))[::-1]
    results = {}

    async def client_loop(client):
        while todo:
            i, p = todo.pop()
            results[i] = await _stream_one(client, url, request_body(side, i, p, new_tokens))

    # llama-server may close a kept-alive connection just as the next request goes out on it
    # (httpx.RemoteProtocolError, no response): a fresh connection per request there
    limits = httpx.Limits(max_connections=concurrency + 4,
                          max_keepalive_connections=0 if side == "llama_cpp" else 20)
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


def serve_run(server, prompts, new_tokens: int, concurrency: int, side: str = "ours") -> dict:
    """`server` (a ServerProcess, or a llama_cpp_peer.LlamaServer with side="llama_cpp")."""
    url = server.url + "/v1/completions"
    asyncio.run(_closed_loop(url, prompts[:1], 2, 1, side))  # one untimed request (warm-up)
    return asyncio.run(_closed_loop(url, prompts, new_tokens, concurrency, side))


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
def run_adapters(path, model, prompt_sets, new, context, levels, tmp, out) -> None:
    """The `adapters` runs: a server with FLAGS.adapters random adapters."""
    dirs = save_random_adapters(tmp, BENCH_134M, FLAGS.adapters, FLAGS.adapter_rank,
                                FLAGS.adapter_targets, base_dir=path, seed=FLAGS.seed + 1)
    listed = [f"adapter{k}={d}" for k, d in enumerate(dirs, 1)]
    t0 = time.perf_counter()
    server = ServerProcess(
        checkpoint_dir=path, train_config="", model_name=MODEL, dtype="float32",
        context_length=context, max_slots=max(levels), max_queue=1024,
        prefill_chunk=FLAGS.prefill_chunk, prefix_cache_mb=0, adapters=",".join(listed))
    try:
        server.wait_ready(timeout=1800)
        out["adapters"] = dict(count=FLAGS.adapters, rank=FLAGS.adapter_rank,
                               targets=FLAGS.adapter_targets,
                               start_s=time.perf_counter() - t0,
                               compiles_at_ready=server.metric("llama2_jax_compiles"))
        for c in levels:
            for side in ("adapter_base", "adapters"):
                r = serve_run(server, prompt_sets[c], new, c,
                              side="ours" if side == "adapter_base" else side)
                out["levels"][c][side] = summary(r)
                print(f"{side:14s} {c:3d} clients: {r['tok_s']:7.1f} tok/s "
                      f"({r['tok_s'] / out['levels'][c]['ours']['tok_s']:.2f}x ours)", flush=True)
        out["adapters"]["compiles_after_runs"] = server.metric("llama2_jax_compiles")
        out["adapters"]["rss_gb"] = server.rss_bytes() / 1e9
    finally:
        out["adapters"]["exit"] = server.terminate()


def make_prompts(rng, n: int) -> list[list[int]]:
    lengths = rng.integers(FLAGS.min_prompt, FLAGS.max_prompt + 1, n)
    return [rng.integers(3, BENCH_134M.vocab_size, int(k)).tolist() for k in lengths]


def first_divergence(a, b) -> int:
    """The first position where the tokens differ (None, an id not streamed, matches any)."""
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y and None not in (x, y)),
                min(len(a), len(b)))


def run_llama_cpp(params: dict, prompt_sets: dict, new: int, context: int, out: dict) -> None:
    """The llama_cpp side into `out`, or the reason it cannot run here."""
    levels = list(prompt_sets)
    try:
        binaries = llama_cpp_peer.build()
        with tempfile.TemporaryDirectory() as tmp:
            gguf = llama_cpp_peer.write_gguf(params, BENCH_134M, TOKENIZER,
                                             os.path.join(tmp, "bench-f32.gguf"))
            groups = ([(c, [c]) for c in levels] if FLAGS.llama_cpp_slots == "level"
                      else [(max(levels), levels)])
            out["llama_cpp"] = dict(version=f"llama-cpp-python {llama_cpp_peer.VERSION}'s "
                                    "vendored llama.cpp", model="F32 GGUF", servers={})
            for slots, group in groups:
                with llama_cpp_peer.LlamaServer(gguf, slots, context, FLAGS.threads,
                                                binaries=binaries,
                                                extra_args=FLAGS.llama_cpp_args) as server:
                    out["llama_cpp"]["servers"][slots] = dict(
                        command=" ".join(server.command), start_s=server.start_s)
                    for c in group:
                        r = serve_run(server, prompt_sets[c], new, c, side="llama_cpp")
                        out["levels"][c]["llama_cpp"] = dict(summary(r), np=slots)
                        out["levels"][c]["llama_cpp_tokens"] = r["tokens"]
                        print(f"llama.cpp  {c:3d} clients: {r['tok_s']:7.1f} tok/s "
                              f"(-np {slots})", flush=True)
    except llama_cpp_peer.PeerUnavailable as e:
        out["llama_cpp_skipped"] = str(e)
        print(f"llama.cpp column skipped: {e}", flush=True)


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
        sides=FLAGS.sides,
        prompts=f"{FLAGS.min_prompt}-{FLAGS.max_prompt} tokens, uniform",
        max_slots=max(levels), prefill_chunk=FLAGS.prefill_chunk, threads=FLAGS.threads,
        sampling=FLAGS.sampling, kv_quantization=FLAGS.kv_quantization,
        jax=jax.__version__, python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")))
    for c in levels:
        out["levels"][c] = {}

    if "ours" in FLAGS.sides:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, MODEL)
            checkpoint.save(path, model, tokenizer_path=TOKENIZER)
            t0 = time.perf_counter()
            server = ServerProcess(
                checkpoint_dir=path, train_config="", model_name=MODEL, dtype="float32",
                context_length=context, max_slots=max(levels), max_queue=1024,
                prefill_chunk=FLAGS.prefill_chunk, prefix_cache_mb=0,
                kv_quantization=FLAGS.kv_quantization)
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
                    if FLAGS.features:
                        f = serve_run(server, prompt_sets[c], new, c, side="features")
                        out["levels"][c]["features"] = summary(f)
                        print(f"features   {c:3d} clients: {f['tok_s']:7.1f} tok/s "
                              f"({f['tok_s'] / r['tok_s']:.2f}x ours)", flush=True)
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
            if FLAGS.adapters:
                run_adapters(path, model, prompt_sets, new, context, levels, tmp, out)

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

    params = None
    if "hf" in FLAGS.sides or "llama_cpp" in FLAGS.sides:
        from jax.tree_util import tree_map
        params = tree_map(np.asarray, checkpoint.params_of(model))

    if "hf" in FLAGS.sides:
        hf = hf_model_from(params, BENCH_134M)
        for c in levels:
            r = hf_continuous_batching(hf, prompt_sets[c], new, c, threads=FLAGS.threads)
            out["levels"][c]["hf"] = summary(r)
            out["levels"][c]["hf_tokens"] = r["tokens"]
            print(f"hf         {c:3d} clients: {r['tok_s']:7.1f} tok/s", flush=True)
        del hf

    if "llama_cpp" in FLAGS.sides:
        run_llama_cpp(params, prompt_sets, new, context, out)

    # token agreement (greedy requests only: sampled ones draw from other generators)
    for c in levels if FLAGS.sampling == "greedy" else []:
        lv = out["levels"][c]
        if "ours_tokens" in lv and "hf_tokens" in lv:
            pairs = list(zip(lv["ours_tokens"], lv["hf_tokens"]))
            lv["equal_to_hf"] = sum(a == b for a, b in pairs)
            lv["first_divergence_from_hf"] = [first_divergence(a, b) for a, b in pairs]
        if "ours_tokens" in lv and "llama_cpp_tokens" in lv:
            pairs = list(zip(lv["ours_tokens"], lv["llama_cpp_tokens"]))
            lv["llama_cpp_first_divergence_from_ours"] = [first_divergence(a, b)
                                                          for a, b in pairs]
            lv["llama_cpp_equal_to_ours"] = sum(
                d == len(a) == len(b) for d, (a, b) in
                zip(lv["llama_cpp_first_divergence_from_ours"], pairs))
            lv["llama_cpp_ids_not_streamed"] = sum(
                t is None for ts in lv["llama_cpp_tokens"] for t in ts)
        if c == min(levels) and "ours_tokens" in lv and "generate_tokens" in out:
            lv["equal_to_generate"] = sum(
                a == b for a, b in zip(lv["ours_tokens"], out["generate_tokens"]))
    return out


def table(out: dict) -> str:
    rows = ["| clients | requests | side | output tok/s | TTFT p50 / p95 ms | ITL p50 / p95 ms "
            "| ours / HF | ours / llama.cpp |", "|---:|---:|---|---:|---:|---:|---:|---:|"]
    names = {"ours": "ours", "features": "ours, features on",
             "adapter_base": "adapter server, base", "adapters": "adapters + features",
             "hf": "hf", "llama_cpp": "llama.cpp"}
    for c, lv in out["levels"].items():
        for side in names:
            if side not in lv:
                continue
            s = lv[side]
            ratios = [f"**{s['tok_s'] / lv[peer]['tok_s']:.2f}x**"
                      if side == "ours" and peer in lv else "" for peer in ("hf", "llama_cpp")]
            if side in ("features", "adapter_base", "adapters"):
                ratios = [f"{s['tok_s'] / lv['ours']['tok_s']:.2f}x of ours", ""]
            name = names[side] + (f" -np {s['np']}" if "np" in s else "")
            rows.append(f"| {c} | {s['requests']} | {name} | {s['tok_s']:.1f} | "
                        f"{s['ttft_p50_ms']:.0f} / {s['ttft_p95_ms']:.0f} | "
                        f"{s['itl_p50_ms']:.1f} / {s['itl_p95_ms']:.1f} | "
                        f"{' | '.join(ratios)} |")
    lines = ["\n".join(rows)]
    if "llama_cpp_skipped" in out:
        lines.append(f"llama.cpp column skipped: {out['llama_cpp_skipped']}")
    for slots, server in out.get("llama_cpp", {}).get("servers", {}).items():
        lines.append(f"llama.cpp -np {slots}: `{server['command']}` (ready in "
                     f"{server['start_s']:.1f} s)")
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
        if "llama_cpp_equal_to_ours" in lv:
            d = lv["llama_cpp_first_divergence_from_ours"]
            lines.append(f"{c} clients: {lv['llama_cpp_equal_to_ours']}/{len(d)} requests' "
                         f"greedy tokens of llama.cpp equal to ours (its "
                         f"{lv['llama_cpp_ids_not_streamed']} ids not streamed, tokens held "
                         f"back mid-UTF-8 character, match any); first divergences {d}")
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
    if "adapters" in out:
        a = out["adapters"]
        lines.append(f"adapter server: {a['count']} adapters of rank {a['rank']} on "
                     f"{','.join(a['targets'])}; ready in {a['start_s']:.0f} s, "
                     f"{a['compiles_at_ready']:.0f} compiles at ready, "
                     f"{a['compiles_after_runs']:.0f} after the runs; RSS {a['rss_gb']:.2f} GB")
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
