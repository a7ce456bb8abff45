"""The planner against XLA:TPU's own compiler, and decode throughput estimated from its cost
analysis: every figure comes from libtpu compiling the real steps for a TPU topology on this
host (nothing executes; `pip install -e '.[tpu]'`).

  python benchmarks/bench_tpu.py plan          # planner vs XLA:TPU per device, markdown
  python benchmarks/bench_tpu.py plan --models=7b --devices="8 x tpu-v5e" --tasks=serve
  python benchmarks/bench_tpu.py decode        # the decode step: temporaries, HBM, tok/s estimate

`plan`: for each model, device set and task, the planner's per-device total (its chosen
format and mesh) beside XLA:TPU's (the arrays held between steps + the largest step's
temporaries and new outputs). `decode`: 7B decode steps on v5e-8 (tensor=8) at 1, 16, 64 and
96 slots: temporaries against the KV cache, HBM bytes against weights + cache (weights none / int8 /
int4 with --quantizations, the KV cache none / int8 with --kv_quantizations), and
max(flops / peak, HBM bytes / bandwidth) per step as tokens/s -- an estimate, not a measurement.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from llama2_jax import aot, plan  # noqa: E402
from llama2_jax.footprint import Task  # noqa: E402
from llama2_jax.model import config as configs  # noqa: E402

GiB = 1 << 30


def plan_table(args) -> None:
    print("| model | devices | task | format, mesh | planned GiB/device | XLA:TPU GiB/device "
          "| planned / XLA | fits (XLA) |")
    print("|---|---|---|---|---:|---:|---:|---|")
    for name in args.models.split(","):
        cfg = configs.preset(name)
        for spec in args.devices.split(";"):
            devices = plan.parse_devices(spec)
            for task_name in args.tasks.split(","):
                task = Task(task_name, context=args.context, slots=args.slots,
                            batch=args.batch, seq_len=args.seq_len,
                            lora_rank=args.lora_rank)
                p = plan.make_plan(cfg, task, devices, model=name)
                label = f"{p.quantization}, {plan.mesh_text(p.mesh)}"
                t0 = time.perf_counter()
                try:
                    c = aot.check_plan(cfg, p)
                except Exception as e:  # noqa: BLE001 -- a step the compiler refuses: say so
                    msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else repr(e)
                    print(f"| {name} | {devices} | {task_name} | {label} | "
                          f"{p.total / GiB:.2f} | compile failed: {msg} | | |", flush=True)
                    continue
                fits = "yes" if c.total <= devices.bytes else "**no**"
                print(f"| {name} | {devices} | {task_name} | {label} | {p.total / GiB:.2f} | "
                      f"{c.total / GiB:.2f} | {p.total / c.total:.2f} | {fits} |"
                      f"  <!-- {time.perf_counter() - t0:.0f} s -->", flush=True)


def decode_table(args) -> None:
    cfg = configs.preset("7b").with_dtype("bfloat16")
    mesh = aot.mesh_on(aot.topology("v5e:2x4"), {"data": 1, "fsdp": 1, "tensor": 8})
    print("| weights | KV cache | slots x positions (attend) | args GiB | temp MiB "
          "| temp / KV cache | HBM GB/step | HBM / (weights + cache) | XLA bytes accessed GB "
          "| est. step ms | est. tok/s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for q, kv, shape in itertools.product(args.quantizations.split(","),
                                          args.kv_quantizations.split(","),
                                          args.shapes.split(",")):
        slots, length = (int(x) for x in shape.split("x"))
        s = aot.abstract_slots(cfg, mesh, slots=slots, length=length, quantization=q,
                               kv_quantization=kv)
        cache, weights = aot.device_bytes(s.cache), aot.device_bytes(s.weights.leaves)
        decode = [r for r in aot.serve_steps(cfg, mesh, slots=slots, length=length,
                                             quantization=q, kv_quantization=kv,
                                             kinds=("decode",))][-1]
        step = aot.estimate_seconds(decode, "tpu-v5e")
        print(f"| {q} | {kv} | {slots} x {length} | {decode.args_bytes / GiB:.2f} | "
              f"{decode.temp_bytes / 2**20:,.1f} | {decode.temp_bytes / cache:.3f} | "
              f"{decode.hbm_bytes / 1e9:.2f} | {decode.hbm_bytes / (weights + cache):.2f} | "
              f"{decode.bytes_accessed / 1e9:.2f} | {step * 1e3:.1f} | "
              f"{slots / step:,.0f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("plan", "decode"))
    p.add_argument("--models", default="7b,13b,70b")
    p.add_argument("--devices", default="8 x tpu-v5e;1 x tpu-v5e;4 x tpu-v4;8 x tpu-v6e;"
                   "8 x tpu-v3", help="';'-separated device sets")
    p.add_argument("--tasks", default="chat,serve,lora")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--lora_rank", type=int, default=16)
    p.add_argument("--quantizations", default="none,int8")
    p.add_argument("--kv_quantizations", default="none", help="KV cache formats: none,int8,fp8")
    p.add_argument("--shapes", default="1x2048,16x2048,64x1024,96x1024")
    args = p.parse_args()
    (plan_table if args.what == "plan" else decode_table)(args)


if __name__ == "__main__":
    main()
