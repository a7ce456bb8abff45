"""Memory plans: what a model needs on each device for a task, what the devices have, and the
mesh and 8-bit format that fit.

  python -m llama2_jax.plan --model 70b --devices="8 x tpu-v5e" --task=serve
  python -m llama2_jax.plan --checkpoint_dir=checkpoints/llama-2-7b-chat --task=chat --json

Every byte count the apps rely on is here. Weights come from the model's abstract parameters
sharded by the one rules table (llama2_jax.model.sharding), in the dtype and 8-bit format asked; the
KV cache from the layout the chat session or the server allocates; step temporaries from the
formulas below; fine-tuning adds master weights, gradients, AdamW's two moments and
activations. Device memory is `device.memory_stats()["bytes_limit"]` where the backend reports
it, else the table `DEVICES`; `cpu` is this machine's RAM.

Temporaries (bytes per device; R rows of T tokens attending over S positions, D model width,
F feed-forward width, N query heads, V vocabulary, e the compute dtype's size, t the tensor
axis where heads split):
  activations   R T (4 D + 3 F / t) e        hidden state, q/k/v, attention output, MLP
  attention     2 R (N / t) T S 4            float32 scores and probabilities
  logits        3 R V 4 (x2 when sampling)   float32 logits, log-softmax, sort for top-p
Prefill and decode steps do not overlap: the larger counts. A step over scanned layers (on
accelerators always) also holds a copy of one layer's weights and of its keys/values for the
rows and positions it reads (`scanned_layer_bytes`; checked against XLA's memory_analysis()
by benchmarks/bench_plan_xla.py). On the CPU the process's own
memory counts too: Python, jaxlib and the tokenizer (`CPU_RUNTIME_BYTES`), the compiled steps'
code (`CPU_CODE_BYTES` per layer a step runs unrolled, times the steps: the chat's prefill and
decode, the server's every bucket, see `serve_steps`), the engine's per-layer copy of the
layer weights (llama2_jax.inference.generate, `unstack`), and, when fine-tuning, orbax's host copy of the
trained weights and optimizer state while a checkpoint is saved. Constants measured with
benchmarks/bench_plan.py (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh

from llama2_jax.inference.buckets import Shapes, group_sizes
from llama2_jax.model import kv_cache, sharding
from llama2_jax.model.config import DTYPES, ModelConfig

GiB = 1 << 30
MiB = 1 << 20

# Memory one JAX device has: (bytes, platform). TPU v2/v3 show each core as a device, v4 and
# later each chip; GPUs as the driver reports them (nvidia-smi's MiB).
DEVICES: dict[str, tuple[int, str]] = {
    "tpu-v2": (8 * GiB, "tpu"),
    "tpu-v3": (16 * GiB, "tpu"),
    "tpu-v4": (32 * GiB, "tpu"),
    "tpu-v5e": (16 * GiB, "tpu"),
    "tpu-v5p": (95 * GiB, "tpu"),
    "tpu-v6e": (32 * GiB, "tpu"),
    "h100": (81559 * MiB, "gpu"),
    "h200": (143771 * MiB, "gpu"),
    "a100-40": (40960 * MiB, "gpu"),
    "a100-80": (81920 * MiB, "gpu"),
    "l4": (23034 * MiB, "gpu"),
    "t4": (15360 * MiB, "gpu"),
}
# JAX takes this share of a GPU's memory at start (XLA_PYTHON_CLIENT_MEM_FRACTION).
GPU_FRACTION = 0.75
# What a CPU process holds besides its arrays and compiled code: Python, jaxlib, the tokenizer
# (measured: benchmarks/bench_plan.py).
CPU_RUNTIME_BYTES = 150 * MiB
# XLA:CPU's compiled code per layer of a step's unrolled program (measured: the 134M server's
# 36 steps of 12 layers held 1.6 GB more than its arrays).
CPU_CODE_BYTES = 3_600_000
CHAT_CHUNK = 256  # the chat Session's prefill chunk (Slots' default)
HEADROOM = 0.05  # of each device's memory, never planned: fragmentation, small buffers
TASKS = ("chat", "serve", "sft", "lora")
QUANTIZATIONS = ("none", "int8", "fp8")


class PlanError(ValueError):
    """Settings a plan cannot be made for (unknown device, bad number)."""


@dataclasses.dataclass(frozen=True)
class Devices:
    count: int
    kind: str  # a DEVICES name, or "cpu"
    bytes: int  # memory of one device the plan may use
    platform: str  # cpu | gpu | tpu
    source: str  # where `bytes` comes from

    def __str__(self) -> str:
        return f"{self.count} x {self.kind}"


def available_ram() -> int:
    """This machine's RAM (MemTotal of /proc/meminfo): what a process may plan for. Not
    MemAvailable, which moves with whatever else runs (a plan would then refuse a run that
    fits, or accept one that fits only while the machine is idle)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_devices(spec: str) -> Devices:
    """"8 x tpu-v5e", "2xh100", "h100", "cpu" (this machine's RAM), "" (the devices present)."""
    spec = spec.strip().lower()
    if not spec:
        return present_devices()
    m = re.fullmatch(r"(?:(\d+)\s*x\s*)?([a-z0-9.-]+)", spec)
    if not m:
        raise PlanError(f"--devices={spec!r}: expected '<count> x <kind>', e.g. '8 x tpu-v5e'")
    count, kind = int(m.group(1) or 1), m.group(2)
    if count < 1:
        raise PlanError(f"--devices={spec!r}: the count must be >= 1")
    if kind == "cpu":
        return Devices(count, "cpu", available_ram() // count, "cpu", "MemTotal")
    if kind not in DEVICES:
        raise PlanError(f"unknown device kind {kind!r}; known: cpu, {', '.join(DEVICES)}")
    size, platform = DEVICES[kind]
    fraction = gpu_fraction() if platform == "gpu" else 1.0
    source = "table" + (f" x {fraction:g} (JAX's share of a GPU)" if platform == "gpu" else "")
    return Devices(count, kind, int(size * fraction), platform, source)


def gpu_fraction() -> float:
    if os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() == "false":
        return 1.0
    try:
        return float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_FRACTION))
    except ValueError:
        return GPU_FRACTION


def present_devices() -> Devices:
    """The devices JAX sees, with their memory as the backend reports it."""
    devices = jax.devices()
    d = devices[0]
    if d.platform == "cpu":
        return Devices(len(devices), "cpu", available_ram() // len(devices), "cpu",
                       "MemTotal")
    stats = d.memory_stats() or {}
    kind = _kind_name(d.device_kind)
    if stats.get("bytes_limit"):
        return Devices(len(devices), kind, int(stats["bytes_limit"]), d.platform,
                       "memory_stats")
    if kind in DEVICES:
        return dataclasses.replace(parse_devices(f"{len(devices)} x {kind}"), kind=kind)
    raise PlanError(f"the {d.device_kind} devices report no memory; name them with "
                    f"--devices (known: {', '.join(DEVICES)})")


def _kind_name(device_kind: str) -> str:
    k = device_kind.lower()
    for name in ("h200", "h100", "l4", "t4"):
        if name in k:
            return name
    if "a100" in k:
        return "a100-80" if "80" in k else "a100-40"
    m = re.search(r"tpu v?(\d[a-z]?)( lite)?", k)
    if m:
        return f"tpu-v{m.group(1)}" + ("e" if m.group(2) and not m.group(1).endswith("e")
                                       else "")
    return k.replace(" ", "-")


# -- what a task needs ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Task:
    """What runs: `name` one of TASKS; chat/serve: `context` positions (`slots` requests at a
    time for serve, `prefill_chunk` tokens per prefill call, `prefix_cache_mb`); sft/lora:
    `batch` sequences of `seq_len` tokens per micro-batch, `lora_rank`, `remat`,
    `param_dtype` (master weights), `grad_accum`."""

    name: str = "chat"
    context: int = 0  # 0 = the model's max_seq_len
    slots: int = 8
    prefill_chunk: int = 256
    prefix_cache_mb: float = 0.0
    batch: int = 1
    seq_len: int = 1024
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    remat: bool = True
    param_dtype: str = "float32"
    grad_accum: int = 1


def task_of(config, app: str) -> Task:
    """The Task an app's config (configs/*.py) runs: app chat, serve or finetune."""
    if app == "serve":
        return Task("serve", context=config.context_length, slots=config.max_slots,
                    prefill_chunk=config.prefill_chunk, prefix_cache_mb=config.prefix_cache_mb)
    if app == "finetune":
        lora = config.lora.rank > 0
        return Task("lora" if lora else "sft", batch=config.batch_size // config.grad_accum,
                    seq_len=config.seq_len, lora_rank=config.lora.rank,
                    lora_targets=tuple(config.lora.targets), remat=config.remat,
                    param_dtype=config.param_dtype, grad_accum=config.grad_accum)
    return Task("chat", context=config.context_length)


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


def _abstract_mesh(mesh: dict[str, int]) -> AbstractMesh:
    return AbstractMesh(tuple(mesh[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)


def _shard_bytes(tree) -> int:
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def weight_bytes(cfg: ModelConfig, mesh: dict[str, int], quantization: str) -> dict[str, int]:
    """Bytes one device holds of the model's parameters in `cfg.param_dtype`, quantized as
    asked: {"layers": ..., "other": ...} (the embeddings, output and final norm)."""
    from llama2_jax.model.checkpoint import _abstract_target  # the restore target, sharded
    _, _, target = _abstract_target(cfg, _abstract_mesh(mesh), quantization)
    layers = _shard_bytes(target["layers"])
    return {"layers": layers, "other": _shard_bytes(target) - layers}


def kv_bytes(cfg: ModelConfig, mesh: dict[str, int], rows: Sequence[int], length: int) -> int:
    """KV cache of row groups `rows`, `length` positions each, on one device: keys/values in
    the compute dtype, KV heads split over `tensor` (when it divides them), each group's rows
    over `data` x `fsdp` (when they divide them)."""
    amesh = _abstract_mesh(mesh)
    total = 0
    for r in rows:
        shape = (cfg.n_layers, r, cfg.n_kv_heads, length, cfg.head_dim)
        s = sharding.named_sharding(amesh, kv_cache.KVCache.axes(), shape)
        total += 2 * int(np.prod(s.shard_shape(shape)))
    return total * cfg.compute_dtype.itemsize


def scanned_layer_bytes(cfg: ModelConfig, mesh: dict[str, int], quantization: str,
                        rows: int = 1, attend: int = 0) -> int:
    """One layer's weights on one device, and its keys/values of `rows` x `attend` positions:
    a step over the scanned layers copies each layer's slices out of the stacks (XLA's
    memory_analysis() of the 7B/13B/70B steps on 8 simulated devices counts both,
    benchmarks/bench_plan_xla.py)."""
    kv = kv_bytes(cfg, mesh, (rows,), attend) // cfg.n_layers if attend else 0
    return weight_bytes(cfg, mesh, quantization)["layers"] // cfg.n_layers + kv


def _split(n: int, k: int) -> int:
    return n // k if n % k == 0 else n


def step_temporaries(cfg: ModelConfig, mesh: dict[str, int], rows: int, tokens: int,
                     attend: int, sampling: bool = True) -> int:
    """The formula of the module docstring for one step."""
    t = mesh["tensor"]
    e = cfg.compute_dtype.itemsize
    act = rows * tokens * (4 * cfg.dim + 3 * _split(cfg.ffn_dim, t)) * e
    attn = 2 * rows * _split(cfg.n_heads, t) * tokens * attend * 4
    logits = 3 * rows * cfg.vocab_size * 4 * (2 if sampling else 1)
    return act + attn + logits


def inference_bytes(cfg: ModelConfig, task: Task, devices: Devices, mesh: dict[str, int],
                    quantization: str) -> dict[str, int]:
    """Per-device bytes of the chat app or the server, by kind."""
    from llama2_jax.inference.weights import DEFAULT_OPTIONS
    context = task.context or cfg.max_seq_len
    rows = task.slots if task.name == "serve" else 1
    w = weight_bytes(cfg, mesh, quantization)
    out = {"weights": w["layers"] + w["other"]}
    if devices.platform == "cpu":
        # Weights(unstack=None): a per-layer copy of the layer weights when all of them take
        # at most unstack_max_bytes (llama2_jax.inference.weights); else the layers are scanned, and
        # XLA:CPU copies each one's slice out of the stack, converted to the compute dtype.
        everything = weight_bytes(cfg, {"data": 1, "fsdp": 1, "tensor": 1},
                                  quantization)["layers"]
        if everything <= DEFAULT_OPTIONS.unstack_max_bytes:
            out["per-layer weight copy"] = w["layers"]
        else:
            layer = scanned_layer_bytes(cfg, mesh, quantization)
            itemsize = 1 if quantization in ("int8", "fp8") else np.dtype(cfg.weight_dtype).itemsize
            out["scanned layer copy"] = layer * cfg.compute_dtype.itemsize // itemsize + \
                scanned_layer_bytes(cfg, mesh, quantization, rows, context)
    else:  # accelerators scan the layers
        out["scanned layer copy"] = scanned_layer_bytes(cfg, mesh, quantization, rows, context)
    if task.name == "serve":
        # the slots, and the staging row (a single slot is its own staging row)
        out["KV cache"] = kv_bytes(cfg, mesh, group_sizes(task.slots), context) + \
            (kv_bytes(cfg, mesh, (1,), context) if task.slots > 1 else 0)
        if task.prefix_cache_mb:
            out["prefix cache"] = int(task.prefix_cache_mb * MiB)
        chunk = min(task.prefill_chunk, context)
        out["temporaries"] = max(step_temporaries(cfg, mesh, task.slots, 1, context),
                                 step_temporaries(cfg, mesh, 1, chunk, context))
    else:  # the chat session: one slot (its own staging row), prefilled a chunk at a time
        out["KV cache"] = kv_bytes(cfg, mesh, (1,), context)
        chunk = min(CHAT_CHUNK, context)
        out["temporaries"] = max(step_temporaries(cfg, mesh, 1, 1, context),
                                 step_temporaries(cfg, mesh, 1, chunk, context))
    if devices.platform == "cpu":
        out["runtime (Python, XLA)"] = CPU_RUNTIME_BYTES // devices.count
        unrolled = cfg.n_layers if "per-layer weight copy" in out else 1
        steps = serve_steps(task.slots, context, task.prefill_chunk) if task.name == "serve" \
            else 4  # a chat compiles as it goes: a few prefill and decode shapes
        out["compiled code"] = steps * unrolled * CPU_CODE_BYTES // devices.count
    return out


def serve_steps(slots: int, length: int, chunk: int, backend: str = "cpu") -> int:
    """How many steps the server compiles at start (llama2_jax.inference.slots.Slots.warm_up),
    from the Slots' own bucket arithmetic (llama2_jax.inference.buckets)."""
    shapes = Shapes.make(slots, length, chunk=chunk, backend=backend)
    return shapes.compiled_steps(shared_stage=slots == 1)


def lora_params(cfg: ModelConfig, rank: int, targets: Sequence[str]) -> int:
    d, h, n, k, f = cfg.dim, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim
    shapes = {"wq": (d, n * h), "wk": (d, k * h), "wv": (d, k * h), "wo": (n * h, d),
              "w1": (d, f), "w3": (d, f), "w2": (f, d)}
    return cfg.n_layers * sum(rank * sum(shapes[t]) for t in targets)


def training_bytes(cfg: ModelConfig, task: Task, devices: Devices, mesh: dict[str, int],
                   quantization: str) -> dict[str, int]:
    """Per-device bytes of a fine-tuning step (sft: every weight trained; lora: adapters on a
    frozen base, 8-bit if `quantization`), by kind."""
    shards = mesh["data"] * mesh["fsdp"] * mesh["tensor"]
    e = cfg.compute_dtype.itemsize
    master = cfg.replace(param_dtype=task.param_dtype)
    out = {}
    if task.name == "sft":
        w = weight_bytes(master, mesh, "none")
        params = w["layers"] + w["other"]
        out["master weights"] = params
        trainable_elems = params // np.dtype(task.param_dtype).itemsize
        if cfg.dtype != task.param_dtype:
            out["weights in compute dtype"] = trainable_elems * e
    else:
        w = weight_bytes(master, mesh, quantization)
        out["frozen base"] = w["layers"] + w["other"]
        trainable_elems = math.ceil(lora_params(cfg, task.lora_rank, task.lora_targets)
                                    / shards)
        out["adapters"] = trainable_elems * 4
    out["gradients"] = trainable_elems * 4 * (2 if task.grad_accum > 1 else 1)
    out["AdamW moments"] = 2 * trainable_elems * 4
    b = max(1, task.batch // (mesh["data"] * mesh["fsdp"]))  # sequences per device
    T = task.seq_len
    t = mesh["tensor"]
    per_layer = step_temporaries(cfg, mesh, b, T, T, sampling=False) - 3 * b * cfg.vocab_size * 4
    boundary = b * T * cfg.dim * e
    if task.remat:  # layer inputs kept; one layer's activations live in the backward pass
        out["activations"] = cfg.n_layers * boundary + 2 * per_layer
    else:
        out["activations"] = cfg.n_layers * (per_layer + 6 * boundary)
    # float32 logits, their log-softmax, its gradient and the softmax (measured: 4 copies)
    out["logits"] = 4 * b * T * _split(cfg.vocab_size, t) * 4
    # AdamW's update of each trained weight: new moments and the update before donation
    # lets them replace the old ones (measured: 3 copies in float32)
    out["optimizer step temporaries"] = 3 * trainable_elems * 4
    if devices.platform == "cpu":
        out["runtime (Python, XLA)"] = CPU_RUNTIME_BYTES // devices.count
        # orbax copies what a checkpoint holds to host memory while it saves it
        out["checkpoint save copy"] = out["gradients"] // (2 if task.grad_accum > 1 else 1) \
            + out["AdamW moments"]
        out["compiled code"] = 2 * CPU_CODE_BYTES // devices.count  # train and eval steps
    return out


# -- choosing ------------------------------------------------------------------------------------
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


def estimate(cfg: ModelConfig, task: Task, devices: Devices, mesh: dict[str, int],
             quantization: str) -> dict[str, int]:
    if task.name in ("sft", "lora"):
        return training_bytes(cfg, task, devices, mesh, quantization)
    return inference_bytes(cfg, task, devices, mesh, quantization)


def make_plan(cfg: ModelConfig, task: Task, devices: Devices, *, model: str = "",
              quantization: str = "auto", mesh: dict[str, int] | None = None,
              dtype: str = "") -> Plan:
    """The first plan that fits, trying meshes (`meshes`, or `mesh`) and, with
    quantization="auto", none then int8; if none fits, the closest, with notes that say why
    and what would fit."""
    if task.name not in TASKS:
        raise PlanError(f"task {task.name!r}: expected one of {', '.join(TASKS)}")
    dtype = dtype or ("float32" if devices.platform == "cpu" else "bfloat16")
    if dtype not in DTYPES:
        raise PlanError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    cfg = cfg.with_dtype(dtype)
    if quantization not in ("auto", *QUANTIZATIONS):
        raise PlanError(f"quantization {quantization!r}: expected auto or one of "
                        f"{', '.join(QUANTIZATIONS)}")
    if task.name == "sft" and quantization not in ("auto", "none"):
        raise PlanError("full fine-tuning (sft) trains every weight: quantization must be none")
    methods = (["none", "int8"] if task.name != "sft" else ["none"]) \
        if quantization == "auto" else [quantization]
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
    if plan.quantization == "none" and task.name != "sft":
        q = estimate(cfg, task, devices, plan.mesh, "int8")
        w = q["weights"] if "weights" in q else q.get("frozen base", 0)
        rest = sum(q.values()) - w
        tips.append(f"quantization=int8 needs {gb(w * devices.count)} + "
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


# -- command line --------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from llama2_jax.model import checkpoint
    from llama2_jax.model.config import ConfigError, preset

    ap = argparse.ArgumentParser(prog="python -m llama2_jax.plan",
                                 description="Will a Llama 2 model fit these devices, and how?")
    src = ap.add_mutually_exclusive_group(required=True)
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
    ap.add_argument("--batch", type=int, default=8, help="sft/lora: sequences per step")
    ap.add_argument("--seq_len", type=int, default=1024, help="sft/lora: tokens per sequence")
    ap.add_argument("--lora_rank", type=int, default=16)
    ap.add_argument("--no_remat", action="store_true", help="sft/lora: keep all activations")
    ap.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    args = ap.parse_args(argv)
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
        quantization = args.quantization
        if quantization == "auto" and stored != "none":
            quantization = stored  # a quantized checkpoint stays so
        task = Task(args.task, context=args.context_length, slots=args.slots,
                    batch=args.batch, seq_len=args.seq_len, lora_rank=args.lora_rank,
                    remat=not args.no_remat)
        plan = make_plan(cfg, task, parse_devices(args.devices), model=name,
                         quantization=quantization, dtype=args.dtype)
    except (PlanError, ConfigError, checkpoint.CheckpointError, FileNotFoundError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    print(json.dumps(plan.to_json(), indent=1) if args.json else plan.table())
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
