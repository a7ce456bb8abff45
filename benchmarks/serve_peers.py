"""The Hugging Face side of the serving benchmark: transformers' own continuous batching on CPU.

  JAX_PLATFORMS=cpu python benchmarks/serve_peers.py            # smoke check, BENCH_134M fp32

`hf_continuous_batching` drives a `ContinuousBatchingManager` (transformers 5.x,
`model.init_continuous_batching`: a background thread that schedules every step, paged KV cache)
the way `concurrency` closed-loop clients would use a server: `concurrency` requests are
submitted at the start and each time one finishes the next prompt is submitted, so at most
`concurrency` are in flight. Greedy, exactly `new_tokens` new tokens per request (EOS disabled
with eos_token_id=-1). Requests are streamed (`add_request(streaming=True)`): after every step
the manager puts one `GenerationOutput` per advanced request on its output queue, and this
(client) thread stamps every new token with `time.perf_counter()` when it takes it from there.

Measured, host clock, after one untimed warm-up request through the same manager:
  wall_s         first submit -> last token received
  tok_s          output_tokens / wall_s (prefill included: it is what a client sees)
  ttft_s         per request: its submit -> its first token received (queueing behind earlier
                 requests is not included: a request is submitted only when a slot frees up)
  itl_s          every gap between consecutive tokens of one request, all requests pooled
  delivery_lag_s median of (received - transformers' own stamp, `record_timestamps=True`, taken
                 in the generation thread when the token is appended): the cost of the hand-off
  tokens         generated ids per prompt, in prompt order
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PAGE_SIZE = 64  # tokens per KV page; reads gather only the pages in use, so this only sets waste


def cb_settings(prompts, new_tokens: int, concurrency: int) -> dict:
    """Continuous batching settings sized for `concurrency` requests of up to 512 + new_tokens."""
    longest = max(512, max(len(p) for p in prompts)) + new_tokens
    pages = math.ceil(longest / PAGE_SIZE)
    return dict(
        page_size=PAGE_SIZE,
        # every slot full at once stays above the FIFO scheduler's 15% free-page safety margin
        # (under it, it admits one prefill at a time); explicit, or it takes 60% of free RAM
        num_blocks=math.ceil(concurrency * pages / 0.85) + 1,
        # a whole 512-token prompt plus one decode token of every other slot in one forward
        max_batch_tokens=max(512, max(len(p) for p in prompts)) + concurrency,
        max_requests_per_batch=concurrency,
        allow_block_sharing=False,  # no prefix cache: warm-up and repeats would hit it
        auto_switch_to_flash=False, use_cuda_graph=False, use_async_batching=False,
        default_compile_level=0)  # eager torch, as `generate` runs


def hf_continuous_batching(model, prompts: list[list[int]], new_tokens: int, concurrency: int,
                           *, threads: int, attn_implementation: str = "sdpa",
                           warmup: bool = True) -> dict:
    """Serve `prompts` through transformers' continuous batching with `concurrency` clients.

    Settings (`cb_settings`): pages of 64 tokens, enough for every slot to hold 512 + new_tokens
    tokens with the scheduler's 15% safety margin left free; max_batch_tokens = longest prompt
    (at least 512) + concurrency, so a prompt is prefilled in one forward next to the running
    decodes unless several arrive together (then FIFO chunks them); FIFO scheduler (decodes
    first); prefix sharing off; no flash / CUDA graphs / compile / async batching (CPU).
    Attention: "sdpa" (model's default; the manager keeps it, with a block-diagonal mask over
    the packed batch) or "paged|eager"; the manager accepts nothing else on CPU. The model's
    own attention implementation is restored on return. torch.set_num_threads(threads) is
    process wide: the manager's generation thread runs with it too.
    """
    import torch
    from transformers import ContinuousBatchingConfig, GenerationConfig

    torch.set_num_threads(threads)
    original_attn = model.config._attn_implementation
    model.set_attn_implementation(attn_implementation)
    gen = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=-1,
                           pad_token_id=0)
    settings = cb_settings(prompts, new_tokens, concurrency)
    manager = model.init_continuous_batching(
        generation_config=gen, continuous_batching_config=ContinuousBatchingConfig(**settings))
    manager.start()
    try:
        def serve(batch, n):
            todo = list(enumerate(batch))[::-1]
            ids, submit, stamps, tokens, lags = {}, {}, {}, {}, []

            def submit_next():
                i, p = todo.pop()
                rid = manager.add_request(p, request_id=f"r{i}_{time.perf_counter_ns()}",
                                          max_new_tokens=n, streaming=True,
                                          record_timestamps=True, eos_token_id=-1)
                ids[rid], submit[i], stamps[i], tokens[i] = i, time.perf_counter(), [], []

            for _ in range(min(concurrency, len(todo))):
                submit_next()
            done = 0
            while done < len(batch):
                out = manager.get_result(timeout=1.0)
                now = time.perf_counter()
                if out is None:
                    if not manager.is_running():
                        raise RuntimeError("the continuous batching thread stopped")
                    continue
                if out.error is not None:
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                i = ids[out.request_id]
                fresh = out.generated_tokens[len(tokens[i]):]
                tokens[i] += fresh
                stamps[i] += [now] * len(fresh)
                if fresh and out.timestamps:
                    lags.append(now - out.timestamps[-1])
                if out.is_finished():
                    done += 1
                    if todo:
                        submit_next()
            return submit, stamps, tokens, lags

        with torch.inference_mode():
            if warmup:  # first-forward costs (allocator, oneDNN/MKL kernels) out of the timing
                serve([prompts[0]], 2)
            submit, stamps, tokens, lags = serve(prompts, new_tokens)
    finally:
        manager.stop(block=True)
        manager.destroy()
        model.set_attn_implementation(original_attn)

    order = range(len(prompts))
    wall = max(stamps[i][-1] for i in order) - min(submit.values())
    out_tokens = sum(len(tokens[i]) for i in order)
    return dict(
        wall_s=wall, output_tokens=out_tokens, tok_s=out_tokens / wall,
        ttft_s=[stamps[i][0] - submit[i] for i in order],
        itl_s=[b - a for i in order for a, b in zip(stamps[i], stamps[i][1:])],
        delivery_lag_s=statistics.median(lags) if lags else float("nan"),
        tokens=[tokens[i] for i in order],
        attn_implementation=attn_implementation, concurrency=concurrency, threads=threads,
        settings=settings)


def main() -> None:
    import argparse

    import jax
    import numpy as np
    import torch

    from benchmarks.common import hf_model_from, median
    from llama2_jax.model.checkpoint import params_of, random_model
    from llama2_jax.model.config import BENCH_134M

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--attn", nargs="+", default=["sdpa"], help="sdpa and/or paged|eager")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    model = random_model(BENCH_134M, seed=args.seed)
    hf = hf_model_from(jax.tree.map(np.asarray, params_of(model)), BENCH_134M)
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(3, BENCH_134M.vocab_size, int(n)).tolist()
               for n in rng.integers(16, 257, args.prompts)]
    print(f"{len(prompts)} prompts, lengths {[len(p) for p in prompts]}, "
          f"{args.new_tokens} new tokens, {args.threads} threads")

    runs = []
    for attn in args.attn:
        for c in args.concurrency:
            r = hf_continuous_batching(hf, prompts, args.new_tokens, c, threads=args.threads,
                                       attn_implementation=attn)
            runs.append(r)
            print(f"{attn:>11} concurrency {c}: {r['tok_s']:7.2f} tok/s  wall {r['wall_s']:.2f} s"
                  f"  TTFT p50 {1e3 * median(r['ttft_s']):7.1f} ms"
                  f"  ITL p50 {1e3 * median(r['itl_s']):6.1f} ms"
                  f"  hand-off p50 {1e3 * r['delivery_lag_s']:.2f} ms")

    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        refs = [hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens, eos_token_id=None,
                            pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    for r in runs:
        same = sum(t == ref for t, ref in zip(r["tokens"], refs))
        first = [next((k for k, (a, b) in enumerate(zip(t, ref)) if a != b), len(ref))
                 for t, ref in zip(r["tokens"], refs)]
        print(f"{r['attn_implementation']:>11} concurrency {r['concurrency']}: {same}/{len(refs)} "
              f"requests equal plain generate; first divergence per request {first}")
        assert all(len(t) == args.new_tokens for t in r["tokens"])


if __name__ == "__main__":
    main()
