"""The planner's step temporaries for 7B/13B/70B against XLA's own count: each step of the
server and the chat (the model over a stacked KV cache, layers scanned as on accelerators, with
the log-probabilities the server computes) lowered on abstract sharded inputs for 8 simulated
devices on the planner's mesh, compiled, and `compiled.memory_analysis()` read. Nothing is
allocated: weights and caches are ShapeDtypeStructs.

  python benchmarks/bench_plan_xla.py                 # markdown table for benchmarks/RESULTS.md
  python benchmarks/bench_plan_xla.py --models=7b --dtypes=float32

XLA:CPU is the compiler here, not the accelerators': its buffer assignment is what is
measured (a bfloat16 model's dots run in float32 on a CPU, so XLA:CPU converts the weights
first; the float32 rows are the ones that compare with the planner's accelerator formula).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from llama2_jax.model import checkpoint, config as configs, sharding  # noqa: E402
from llama2_jax import footprint, plan  # noqa: E402
from llama2_jax.model.kv_cache import Blocks, KVCache  # noqa: E402
from llama2_jax.inference.sampling import logprobs  # noqa: E402

MiB = 1 << 20


def xla_temp_bytes(cfg, mesh_sizes: dict, rows: int, tokens: int, attend: int) -> int:
    """temp_size_in_bytes of one step (`rows` x `tokens` over a cache of `attend` positions)."""
    mesh = sharding.make_mesh(mesh_sizes["data"], mesh_sizes["fsdp"], mesh_sizes["tensor"],
                              devices=jax.devices()[:8])
    graphdef, state, target = checkpoint.abstract_target(cfg, mesh)
    shape = (cfg.n_layers, rows, cfg.n_kv_heads, attend, cfg.head_dim)
    kv = jax.ShapeDtypeStruct(shape, cfg.compute_dtype,
                              sharding=sharding.named_sharding(mesh, KVCache.axes(), shape))

    def step(params, cache, tokens_, positions):
        nnx.replace_by_pure_dict(state, params)
        model = nnx.merge(graphdef, state)
        last = jnp.full((rows,), tokens - 1, jnp.int32)
        logits, cache = model(tokens_, positions, cache, logits_at=last, attend=attend)
        drawn = jnp.argmax(logits, -1)
        return logprobs(logits, drawn, jnp.zeros((rows,), bool)), cache

    ids = jax.ShapeDtypeStruct((rows, tokens), jnp.int32)
    with jax.set_mesh(mesh):
        compiled = jax.jit(step, donate_argnums=(1,)).lower(
            target, Blocks(((KVCache(kv, kv),),)), ids, ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="7b,13b,70b")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--devices", default="8 x h100", help="the planner's devices (for the mesh)")
    p.add_argument("--context", type=int, default=4096)
    args = p.parse_args()
    if len(jax.devices()) < 8:
        sys.exit("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    devices = plan.parse_devices(args.devices)
    serve = plan.Task("serve", context=args.context)
    print("| model | mesh | dtype | step | XLA temp MiB | planned MiB | planned / XLA |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        base = configs.preset(name)
        for dtype in args.dtypes.split(","):
            cfg = base.with_dtype(dtype)
            p_ = plan.make_plan(cfg, serve, devices, model=name, quantization="none",
                                dtype=dtype)
            mesh = p_.mesh
            steps = {f"decode {serve.slots} rows": (serve.slots, 1),
                     f"prefill chunk {serve.prefill_chunk}": (1, serve.prefill_chunk),
                     f"chat prefill {args.context}": (1, args.context)}
            for label, (rows, tokens) in steps.items():
                t0 = time.perf_counter()
                xla = xla_temp_bytes(cfg, mesh, rows, tokens, args.context)
                planned = plan.step_temporaries(cfg, mesh, rows, tokens, args.context) + \
                    footprint.scanned_layer_bytes(cfg, mesh, "none", rows, args.context)
                print(f"| {name} | {plan.mesh_text(mesh)} | {dtype} | {label} | "
                      f"{xla / MiB:,.0f} | {planned / MiB:,.0f} | {planned / xla:.2f} |"
                      f"  <!-- {time.perf_counter() - t0:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
