"""Memory plans: what a model needs on each device for a task, what the devices have, and the
mesh and 8-bit format that fit.

  python -m llama2_jax.plan --model 70b --devices="8 x tpu-v5e" --task=serve
  python -m llama2_jax.plan --checkpoint_dir=checkpoints/llama-2-7b-chat --task=chat --json

The bytes a task needs on each device (weights in the format asked, the KV cache the slots
allocate, step temporaries, training state) come from llama2_jax.footprint; device memory is
`device.memory_stats()["bytes_limit"]` where the backend reports it, else the table
llama2_jax.devices.DEVICES; `cpu` is this machine's RAM. One function, `make_plan`, resolves
every app's dtype, weight format and mesh.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Sequence

# The devices' and the bytes' sides of a plan, re-exported (`plan.Devices`, `plan.Task`, ...).
from llama2_jax.devices import (DEVICES, Devices, PlanError, parse_devices,  # noqa: F401
                                present_devices)
from llama2_jax.footprint import (TASKS, Task, estimate, inference_bytes,  # noqa: F401
                                  kv_bytes, serve_steps, step_temporaries, training_bytes,
                                  weight_bytes)
from llama2_jax.model import quant
from llama2_jax.model.checkpoint import AS_STORED
from llama2_jax.model.config import DTYPES, ModelConfig

HEADROOM = 0.05  # of each device's memory, never planned: fragmentation, small buffers
QUANTIZATIONS = quant.METHODS


@dataclasses.dataclass
class Plan:
    model: str
    task: Task
    devices: Devices
    mesh: dict[str, int]
    quantization: str
    dtype: str
    per_device: dict[str, int]  # bytes by kind, one device
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.per_device.values())

    @property
    def usable(self) -> int:
        return int(self.devices.bytes * (1 - HEADROOM))

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    def to_json(self) -> dict:
        return {"model": self.model, "task": dataclasses.asdict(self.task),
                "devices": dataclasses.asdict(self.devices), "mesh": self.mesh,
                "quantization": self.quantization, "dtype": self.dtype,
                "per_device_bytes": {**self.per_device, "total": self.total},
                "device_bytes": self.devices.bytes, "usable_bytes": self.usable,
                "fits": self.fits, "notes": self.notes}

    def table(self) -> str:
        mesh = mesh_text(self.mesh)
        lines = [f"{self.model}, task {self.task.name}, on {self.devices} "
                 f"({gb(self.devices.bytes)} each, {self.devices.source})",
                 f"mesh {mesh}; weights {self.dtype}, quantization {self.quantization}", "",
                 f"{'per device':<24}{'GB':>10}"]
        for kind, n in self.per_device.items():
            lines.append(f"  {kind:<22}{n / 1e9:>10.2f}")
        lines += [f"  {'total':<22}{self.total / 1e9:>10.2f}",
                  f"  {'usable (' + format(1 - HEADROOM, '.0%') + ')':<22}"
                  f"{self.usable / 1e9:>10.2f}",
                  f"  {'headroom':<22}{(self.usable - self.total) / 1e9:>10.2f}", "",
                  "fits" if self.fits else "DOES NOT FIT"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def mesh_text(mesh: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in mesh.items())


# -- choosing ---------------------------------------------------------------------------------
def meshes(cfg: ModelConfig, n: int, task: str) -> list[dict[str, int]]:
    """Meshes over n devices to try, best first: tensor parallelism over as many devices as
    divide the heads (inference: fastest for one request), then FSDP (training; any count)."""
    out = []
    tensors = [t for t in range(n, 0, -1) if n % t == 0 and cfg.n_heads % t == 0]
    if task in ("sft", "lora"):
        out.append({"data": 1, "fsdp": n, "tensor": 1})
        out += [{"data": 1, "fsdp": n // t, "tensor": t} for t in tensors if t > 1]
    else:
        out += [{"data": 1, "fsdp": n // t, "tensor": t} for t in tensors]
    return out


def resolve_quantization(asked: str, stored: str, task: str) -> str:
    """The weight format a task runs with: the one rule for every app and this planner.

    asked: AS_STORED ("": as the checkpoint stores them), "auto" (a quantized checkpoint stays
    so; else the planner tries none, then int8, then int4) or a method. `stored`: the
    checkpoint's format
    ("none" for random weights). Full fine-tuning (sft) trains unquantized weights.
    Returns a method or "auto" (for `make_plan` to choose).
    """
    if asked not in (AS_STORED, "auto", *QUANTIZATIONS):
        raise PlanError(f"quantization {asked!r}: expected '' (as stored), auto or one of "
                        f"{', '.join(QUANTIZATIONS)}")
    if task == "sft":
        if asked not in (AS_STORED, "auto", "none"):
            raise PlanError(f"quantization={asked!r} needs LoRA (lora.rank > 0, task lora): "
                            "full fine-tuning trains every weight in param_dtype")
        return "none"
    if asked == AS_STORED:
        return stored
    if asked == "auto" and stored != "none":
        return stored
    return asked


def make_plan(cfg: ModelConfig, task: Task, devices: Devices, *, model: str = "",
              quantization: str = "auto", stored: str = "none",
              mesh: dict[str, int] | None = None, dtype: str = "") -> Plan:
    """The dtype, mesh and weight format `task` runs with on `devices`: every app's settings
    and this module's command line are resolved here, once.

    dtype "" is bfloat16 on accelerators and float32 on CPU; `quantization` and the
    checkpoint's `stored` format as `resolve_quantization` says ("auto": none, int8, int4);
    the mesh is `mesh`, or the first of `meshes` that fits. If nothing fits, the closest plan,
    with notes that say why and what would fit.
    """
    if task.name not in TASKS:
        raise PlanError(f"task {task.name!r}: expected one of {', '.join(TASKS)}")
    dtype = dtype or ("float32" if devices.platform == "cpu" else "bfloat16")
    if dtype not in DTYPES:
        raise PlanError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    cfg = cfg.with_dtype(dtype)
    quantization = resolve_quantization(quantization, stored, task.name)
    methods = ["none", "int8", "int4"] if quantization == "auto" else [quantization]
    candidates = [mesh] if mesh else meshes(cfg, devices.count, task.name)
    if not candidates:
        raise PlanError(f"no mesh of {devices.count} devices splits the model's "
                        f"{cfg.n_heads} heads")
    name = model or "model"
    plans = [Plan(name, task, devices, m, q, dtype, estimate(cfg, task, devices, m, q))
             for q in methods for m in candidates]
    fitting = [p for p in plans if p.fits]
    if fitting:
        return fitting[0]
    best = min(plans, key=lambda p: p.total)
    best.notes.append(refusal(cfg, task, devices, best))
    return best


def refusal(cfg: ModelConfig, task: Task, devices: Devices, plan: Plan) -> str:
    """Why `plan` does not fit, and the closest setting that would."""
    have = devices.bytes * devices.count
    need = plan.total * devices.count
    text = (f"{plan.model} ({task.name}) in {plan.dtype}, quantization {plan.quantization}, "
            f"needs {gb(need)} in all ({gb(plan.total)} per device); {devices} have "
            f"{gb(have)}")
    tips = []
    smaller = {"none": ("int8", "int4"), "int8": ("int4",), "fp8": ("int4",)}
    for method in smaller.get(plan.quantization, ()) if task.name != "sft" else ():
        q = estimate(cfg, task, devices, plan.mesh, method)
        w = q["weights"] if "weights" in q else q.get("frozen base", 0)
        rest = sum(q.values()) - w
        tips.append(f"quantization={method} needs {gb(w * devices.count)} + "
                    f"{gb(rest * devices.count)} of cache, temporaries and the rest")
    if task.name == "serve" and task.slots > 1:
        tips.append("fewer --slots or a shorter --context_length shrink the KV cache")
    if task.name in ("chat", "serve") and (task.context or cfg.max_seq_len) > 512:
        tips.append("a shorter --context_length shrinks the KV cache and the temporaries")
    if task.name in ("sft", "lora") and not task.remat:
        tips.append("remat=True keeps one layer's activations instead of all")
    if task.name == "sft":
        tips.append("task=lora trains adapters on a frozen base")
    more = math.ceil(need / (devices.bytes * (1 - HEADROOM)))
    if more > devices.count:
        tips.append(f"about {more} x {devices.kind} would hold it")
    return text + (": " + "; ".join(tips) if tips else "")


# -- what fits where -----------------------------------------------------------------------------
TABLE_DEVICES = ("1 x tpu-v5e", "8 x tpu-v5e", "8 x tpu-v3", "1 x l4", "1 x t4", "1 x h100")
TABLE_TASKS = {"chat": Task("chat", context=4096),
               "serve 16 x 4096": Task("serve", context=4096, slots=16),
               "LoRA (1 x 2048 tokens, rank 16)": Task("lora", batch=1, seq_len=2048)}
MAX_TABLE_SLOTS = 256


def most_slots(cfg: ModelConfig, task: Task, devices: Devices, quantization: str) -> int:
    """The most serve slots (up to MAX_TABLE_SLOTS) of task.context positions that fit."""
    def fits(n):
        return make_plan(cfg, dataclasses.replace(task, slots=n), devices,
                         quantization=quantization).fits
    lo, hi = 0, MAX_TABLE_SLOTS
    while lo < hi:  # the largest n with fits(n), fits being monotone in n
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def fits_table(models: Sequence[str] = ("7b", "13b", "70b"),
               devices: Sequence[str] = TABLE_DEVICES) -> str:
    """A markdown table: for each model and task (TABLE_TASKS), on each device class, the
    least-quantized weight format that fits ("auto": none, int8, int4) and, serving, how
    many slots of 4096 positions fit in it (in int4 when 16 fit in none), with the KV cache
    in the compute dtype and in int8."""
    from llama2_jax.model.config import preset
    header = ["model", "task", *devices]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * len(devices)]
    for name in models:
        cfg = preset(name)
        for label, task in TABLE_TASKS.items():
            cells = []
            for d in devices:
                dev = parse_devices(d)
                plan = make_plan(cfg, task, dev, quantization="auto")
                if task.name != "serve":
                    cells.append(plan.quantization if plan.fits else "no")
                    continue
                method = plan.quantization if plan.fits else "int4"
                n = most_slots(cfg, task, dev, method)
                n8 = most_slots(cfg, dataclasses.replace(task, kv_quantization="int8"), dev,
                                method)
                more = lambda k: "+" if k == MAX_TABLE_SLOTS else ""  # noqa: E731
                cells.append(f"{method}, {n}{more(n)} slots ({n8}{more(n8)} with int8 KV)"
                             if n8 else "no")
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from llama2_jax.model import checkpoint
    from llama2_jax.model.config import ConfigError, preset

    ap = argparse.ArgumentParser(prog="python -m llama2_jax.plan",
                                 description="Will a Llama 2 model fit these devices, and how?")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--table", action="store_true",
                     help="what fits where: 7B / 13B / 70B chat, serve and LoRA on the device "
                     "classes people have (a markdown table)")
    src.add_argument("--model", help="preset: 7b, 13b, 70b, tiny, bench_134m ...")
    src.add_argument("--checkpoint_dir", help="a converted checkpoint")
    ap.add_argument("--task", default="chat", choices=TASKS)
    ap.add_argument("--devices", default="",
                    help="'8 x tpu-v5e', '2 x h100', 'cpu' (default: the devices present)")
    ap.add_argument("--quantization", default="auto", choices=("auto", *QUANTIZATIONS))
    ap.add_argument("--dtype", default="", help="bfloat16 / float32 ... (default: bfloat16 "
                    "on accelerators, float32 on CPU)")
    ap.add_argument("--context_length", type=int, default=0,
                    help="chat/serve context (0: the model's)")
    ap.add_argument("--slots", type=int, default=8, help="serve: concurrent requests")
    ap.add_argument("--kv_quantization", default="none", choices=("none", "int8", "fp8"),
                    help="chat/serve: the KV cache in 8 bits (a float32 scale per position "
                    "and KV head)")
    ap.add_argument("--batch", type=int, default=8, help="sft/lora: sequences per step")
    ap.add_argument("--seq_len", type=int, default=1024, help="sft/lora: tokens per sequence")
    ap.add_argument("--lora_rank", type=int, default=16,
                    help="lora: the adapters' rank; serve: max_lora_rank")
    ap.add_argument("--max_loras", type=int, default=0,
                    help="serve: LoRA adapters held at once (rank --lora_rank, all weights)")
    ap.add_argument("--no_remat", action="store_true", help="sft/lora: keep all activations")
    ap.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    ap.add_argument("--compile", action="store_true",
                    help="TPU devices: also compile the plan's steps with XLA:TPU (libtpu, the "
                    "tpu extra; no TPU needed) and print the compiler's per-device memory")
    args = ap.parse_args(argv)
    if args.table:
        print(fits_table())
        return 0
    try:
        stored = "none"
        if args.checkpoint_dir:
            cfg, stored = checkpoint.read_meta(os.path.expanduser(args.checkpoint_dir))
            name = os.path.basename(os.path.normpath(args.checkpoint_dir))
        else:
            cfg, name = preset(args.model), args.model
        for value, what in ((args.context_length, "context_length"), (args.slots, "slots"),
                            (args.batch, "batch"), (args.seq_len, "seq_len")):
            if value < 0 or (value == 0 and what != "context_length"):
                raise PlanError(f"--{what}={value} must be > 0")
        if args.context_length > cfg.max_seq_len:
            raise PlanError(f"--context_length={args.context_length} is over the model's "
                            f"max_seq_len {cfg.max_seq_len}")
        task = Task(args.task, context=args.context_length, slots=args.slots,
                    batch=args.batch, seq_len=args.seq_len, lora_rank=args.lora_rank,
                    remat=not args.no_remat, max_loras=args.max_loras,
                    kv_quantization=args.kv_quantization)
        plan = make_plan(cfg, task, parse_devices(args.devices), model=name,
                         quantization=args.quantization, stored=stored, dtype=args.dtype)
    except (PlanError, ConfigError, checkpoint.CheckpointError, FileNotFoundError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    compiled = None
    if args.compile:
        from llama2_jax import aot
        try:
            compiled = aot.check_plan(cfg, plan)
        except aot.AotError as e:
            sys.stderr.write(f"error: {e}\n")
            return 2
        except Exception as e:  # noqa: BLE001 -- the compiler's own verdict
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            print(plan.table() + "\n\nXLA:TPU: does NOT fit: " + str(e).strip().splitlines()[0])
            return 1
    if args.json:
        out = plan.to_json()
        if compiled:
            out["compiled"] = compiled_json(compiled, plan)
        print(json.dumps(out, indent=1))
    else:
        print(plan.table())
        if compiled:
            print("\n" + compiled_table(compiled, plan))
    # With the compiler's count, its verdict stands (the arithmetic plan errs on the safe side)
    fits = plan.fits if compiled is None else compiled.total <= plan.devices.bytes
    return 0 if fits else 1


def compiled_json(compiled, plan: Plan) -> dict:
    return {"topology": compiled.topology, "resident_bytes": compiled.resident_bytes,
            "total_bytes": compiled.total, "fits": compiled.total <= plan.devices.bytes,
            "steps": [dataclasses.asdict(r) for r in compiled.steps]}


def compiled_table(compiled, plan: Plan) -> str:
    """The compiler's per-device memory beside the plan's."""
    lines = [f"XLA:TPU, topology {compiled.topology}, per device:",
             f"  {'held between steps':<34}{gb(compiled.resident_bytes):>10}"]
    for r in compiled.steps:
        lines.append(f"  {r.name:<34}{gb(r.temp_bytes + r.output_bytes - r.alias_bytes):>10}"
                     "  (temporaries and new outputs)")
    ratio = plan.total / compiled.total if compiled.total else float("nan")
    fits = compiled.total <= plan.devices.bytes
    lines.append(f"  {'peak':<34}{gb(compiled.total):>10}  planned {gb(plan.total)} "
                 f"({ratio:.2f}x); {'fits' if fits else 'does NOT fit'} "
                 f"{gb(plan.devices.bytes)}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
