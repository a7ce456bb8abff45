"""What a task needs on each device, in bytes: the memory planner's arithmetic
(llama2_jax.plan chooses with it).

Weights come from the model's abstract parameters sharded by the one rules table
(llama2_jax.model.sharding), in the dtype and weight format asked; the KV cache from the layout
the slots allocate (llama2_jax.inference.buckets); step temporaries from the formulas below;
fine-tuning adds master weights, gradients, AdamW's two moments and activations.

Temporaries (bytes per device; R rows of T tokens attending over S positions, D model width,
F feed-forward width, N query heads, V vocabulary, e the compute dtype's size, t the tensor
axis where heads split):
  activations   R T (4 D + 3 F / t) e        hidden state, q/k/v, attention output, MLP
  attention     2 R (N / t) T S 4            float32 scores and probabilities
  logits        3 R V 4 (x2 when sampling)   float32 logits, log-softmax, the sampler's weights
Prefill and decode steps do not overlap: the larger counts. A step over scanned layers (on
accelerators always) also holds a copy of one layer's weights and of its keys/values for the
rows and positions it reads (`scanned_layer_bytes`; checked against XLA's memory_analysis()
by benchmarks/bench_plan_xla.py). On the CPU the process's own memory counts too: Python,
jaxlib and the tokenizer (`CPU_RUNTIME_BYTES`), the compiled steps' code (`CPU_CODE_BYTES`
per layer a step runs unrolled, times the steps: the chat's prefill and decode, the server's
every bucket, see `serve_steps`; and the sampler's, `CPU_SAMPLER_BYTES`), the per-layer copy
of the layer weights (llama2_jax.inference.weights, `unstack`), quantized weights converted a
chunk at a time (llama2_jax.model.cpu_matmul; XLA:CPU's memory_analysis() of the 7B int4
decode step: 0.12 GB of temporaries, the layer's slices and two chunks), and, when
fine-tuning, orbax's host copy of the trained weights and optimizer state while a checkpoint
is saved.
Constants measured with benchmarks/bench_plan.py (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh

from llama2_jax.devices import MiB, Devices
from llama2_jax.inference.buckets import Shapes, group_sizes
from llama2_jax.model import cpu_matmul, kv_cache, packed, quant, sharding
from llama2_jax.model.config import ModelConfig

# What a CPU process holds besides its arrays and compiled code: Python, jaxlib, the tokenizer
# (measured: benchmarks/bench_plan.py).
CPU_RUNTIME_BYTES = 150 * MiB
# XLA:CPU's compiled code per layer of a step's unrolled program (measured: the 134M server's
# 36 steps of 12 layers held 1.6 GB more than its arrays).
CPU_CODE_BYTES = 3_600_000
# What compiling the sampler (llama2_jax.inference.sampling: top-k candidates, the bisection
# branch, the draw) adds to an inference process on the CPU: its code in every step and the
# memory XLA:CPU's compiler keeps afterwards (measured with benchmarks/bench_plan.py: the demo
# chat held 126 MB more than with an argmax; fitted over the demo chat, the 134M chat and the
# 134M server). Raised from 200 MiB by what CI's machine measured beyond this one's (the demo
# chat: 478 MB there, 446 MB here; XLA:CPU compiles for the host's instruction set, and its code
# differs in size between machines), so that neither machine is under by more than 5%.
CPU_SAMPLER_BYTES = 232 * MiB
CHAT_CHUNK = 256  # the chat Session's prefill chunk (Slots' default)

TASKS = ("chat", "serve", "sft", "lora")


# -- what a task needs ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Task:
    """What runs: `name` one of TASKS; chat/serve: `context` positions (`slots` requests at a
    time for serve, `prefill_chunk` tokens per prefill call, `prefix_cache_mb`); sft/lora:
    `batch` sequences of `seq_len` tokens per micro-batch, `lora_rank`, `remat`,
    `param_dtype` (master weights), `grad_accum`. serve with `max_loras` > 0: room for that
    many LoRA adapters of rank `lora_rank` on `lora_targets` (llama2_jax.inference.adapters)."""

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
    max_loras: int = 0
    kv_quantization: str = "none"  # chat/serve: the KV cache in 8 bits (int8 / fp8)


def _abstract_mesh(mesh: dict[str, int]) -> AbstractMesh:
    return AbstractMesh(tuple(mesh[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)


def _shard_bytes(tree) -> int:
    return sum(quant.array_bytes(x.sharding.shard_shape(x.shape), x.dtype)
               for x in jax.tree.leaves(tree))


def weight_bytes(cfg: ModelConfig, mesh: dict[str, int], quantization: str) -> dict[str, int]:
    """Bytes one device holds of the model's parameters in `cfg.param_dtype`, quantized as
    asked: {"layers": ..., "other": ...} (the embeddings, output and final norm)."""
    layers, total = _weight_bytes(cfg, tuple(mesh.items()), quantization)
    return {"layers": layers, "other": total - layers}


@functools.lru_cache(maxsize=256)  # a plan asks again for the same model, mesh and format
def _weight_bytes(cfg: ModelConfig, mesh: tuple, quantization: str) -> tuple[int, int]:
    from llama2_jax.model.checkpoint import abstract_target  # the restore target, sharded
    _, _, target = abstract_target(cfg, _abstract_mesh(dict(mesh)), quantization)
    return _shard_bytes(target["layers"]), _shard_bytes(target)


def kv_bytes(cfg: ModelConfig, mesh: dict[str, int], rows: Sequence[int], length: int,
             quantization: str = "none") -> int:
    """KV cache of row groups `rows`, `length` positions each, on one device: keys/values in
    the compute dtype (or 8 bits and a float32 scale per position and head: `quantization`),
    KV heads split over `tensor` (when it divides them), each group's rows over `data` x
    `fsdp` (when they divide them)."""
    amesh = _abstract_mesh(mesh)
    total = 0
    for r in rows:
        shape = (cfg.n_layers, r, cfg.n_kv_heads, length, cfg.head_dim)
        s = sharding.named_sharding(amesh, kv_cache.KVCache.axes(), shape)
        total += 2 * int(np.prod(s.shard_shape(shape)))
    if quantization != "none":  # a byte per value, 4 per H values
        return total + total // cfg.head_dim * 4
    return total * cfg.compute_dtype.itemsize


def scanned_layer_bytes(cfg: ModelConfig, mesh: dict[str, int], quantization: str,
                        rows: int = 1, attend: int = 0) -> int:
    """One layer's weights on one device, and its keys/values of `rows` x `attend` positions:
    a step over the scanned layers copies each layer's slices out of the stacks (XLA's
    memory_analysis() of the 7B/13B/70B steps on 8 simulated devices counts both,
    benchmarks/bench_plan_xla.py)."""
    kv = kv_bytes(cfg, mesh, (rows,), attend) // cfg.n_layers if attend else 0
    return weight_bytes(cfg, mesh, quantization)["layers"] // cfg.n_layers + kv


def _stored_bits(dtype, quantization: str) -> int:
    """Bits per weight value as stored: the quantized format's, else `dtype`'s."""
    return quant.BITS.get(quantization) or 8 * np.dtype(dtype).itemsize


def _split(n: int, k: int) -> int:
    return n // k if n % k == 0 else n


def step_temporaries(cfg: ModelConfig, mesh: dict[str, int], rows: int, tokens: int,
                     attend: int, sampling: bool = True, kv_quantization: str = "none") -> int:
    """The formula of the module docstring for one step."""
    t = mesh["tensor"]
    e = cfg.compute_dtype.itemsize
    act = rows * tokens * (4 * cfg.dim + 3 * _split(cfg.ffn_dim, t)) * e
    attn = 2 * rows * _split(cfg.n_heads, t) * tokens * attend * 4
    logits = 3 * rows * cfg.vocab_size * 4 * (2 if sampling else 1)
    if kv_quantization != "none":  # a layer's 8-bit keys and values converted for attention
        # (XLA:CPU's memory_analysis() of the 134M decode step, 32 rows x 1024: 0.21 GB)
        attn += 2 * rows * _split(cfg.n_kv_heads, t) * attend * cfg.head_dim * e
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
            if (quantization == "none" and math.prod(mesh.values()) == 1
                    and cfg.weight_dtype in packed.DTYPES):
                # with the CPU kernels (a C++ compiler present), the output matrix is also
                # held packed in tiles (llama2_jax.model.packed), next to the model's own
                out["packed output matrix"] = cfg.dim * cfg.vocab_size * cfg.weight_dtype.itemsize
        else:
            out["scanned layer copy"] = scanned_layer_bytes(cfg, mesh, quantization, rows,
                                                            context)
            if quantization != "none":  # (measured on the scanned 7B / 13B steps only)
                # quantized weights are converted a chunk at a time (model/cpu_matmul), two
                # chunks' buffers live at once (XLA:CPU's memory_analysis() of the 7B steps)
                out["converted weight chunks"] = 2 * cpu_matmul.CHUNK_BYTES
                # what a quantizing load leaves resident: measured 0.38 GB (int4) and 0.49 GB
                # (int8) over the weights after loading a 7B bf16 checkpoint; counted as the
                # output matrix in float32 (0.52 GB for 7B), which the load quantizes whole
                out["left by the quantizing load"] = \
                    cfg.dim * _split(cfg.vocab_size, mesh["tensor"]) * 4
    else:  # accelerators scan the layers
        out["scanned layer copy"] = scanned_layer_bytes(cfg, mesh, quantization, rows, context)
    if task.name == "serve":
        # the slots, and the staging row (a single slot is its own staging row)
        kv = task.kv_quantization
        out["KV cache"] = kv_bytes(cfg, mesh, group_sizes(task.slots), context, kv) + \
            (kv_bytes(cfg, mesh, (1,), context, kv) if task.slots > 1 else 0)
        if task.prefix_cache_mb:
            out["prefix cache"] = int(task.prefix_cache_mb * MiB)
        if task.max_loras:  # the adapter stack, replicated, in the compute dtype
            out["LoRA adapters"] = cfg.compute_dtype.itemsize * lora_params(
                cfg, task.lora_rank * task.max_loras, task.lora_targets)
        chunk = min(task.prefill_chunk, context)
        out["temporaries"] = max(step_temporaries(cfg, mesh, task.slots, 1, context, True, kv),
                                 step_temporaries(cfg, mesh, 1, chunk, context, True, kv))
    else:  # the chat session: one slot (its own staging row), prefilled a chunk at a time
        out["KV cache"] = kv_bytes(cfg, mesh, (1,), context, task.kv_quantization)
        chunk = min(CHAT_CHUNK, context)
        kv = task.kv_quantization
        out["temporaries"] = max(step_temporaries(cfg, mesh, 1, 1, context, True, kv),
                                 step_temporaries(cfg, mesh, 1, chunk, context, True, kv))
    if devices.platform == "cpu":
        out["runtime (Python, XLA)"] = CPU_RUNTIME_BYTES // devices.count
        unrolled = cfg.n_layers if "per-layer weight copy" in out else 1
        steps = serve_steps(task.slots, context, task.prefill_chunk) if task.name == "serve" \
            else 4  # a chat compiles as it goes: a few prefill and decode shapes
        out["compiled code"] = (steps * unrolled * CPU_CODE_BYTES
                                + CPU_SAMPLER_BYTES) // devices.count
    return out


def serve_steps(slots: int, length: int, chunk: int, backend: str = "cpu") -> int:
    """How many steps the server compiles at start (llama2_jax.inference.slots.Slots.warm_up,
    with the prompt-logprob prefills of its default `warmup_prompt_logprobs`), from the
    Slots' own bucket arithmetic (llama2_jax.inference.buckets)."""
    shapes = Shapes.make(slots, length, chunk=chunk, backend=backend)
    return shapes.compiled_steps(shared_stage=slots == 1, score=True)


def lora_params(cfg: ModelConfig, rank: int, targets: Sequence[str]) -> int:
    d, h, n, k, f = cfg.dim, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim
    shapes = {"wq": (d, n * h), "wk": (d, k * h), "wv": (d, k * h), "wo": (n * h, d),
              "w1": (d, f), "w3": (d, f), "w2": (f, d)}
    return cfg.n_layers * sum(rank * sum(shapes[t]) for t in targets)


def training_bytes(cfg: ModelConfig, task: Task, devices: Devices, mesh: dict[str, int],
                   quantization: str) -> dict[str, int]:
    """Per-device bytes of a fine-tuning step (sft: every weight trained; lora: adapters on a
    frozen base, 8-bit if `quantization`), by kind."""
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
        # the trainer keeps adapters and their optimizer state replicated (training.lora)
        trainable_elems = lora_params(cfg, task.lora_rank, task.lora_targets)
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
    if mesh["fsdp"] > 1:
        # FSDP gathers one layer's weights whole for its matmuls (as stored and converted to
        # the compute dtype; forward and the rematerialised backward pass), and the embedding
        # and output tables whole as stored (measured with XLA:TPU: benchmarks/bench_tpu.py)
        unsharded = dict(mesh, fsdp=1)
        whole = weight_bytes(master, unsharded, quantization)
        stored = _stored_bits(task.param_dtype, quantization)
        layer = whole["layers"] // cfg.n_layers
        out["FSDP gathered weights"] = layer * (stored + 8 * e) // stored + whole["other"]
    # float32 logits, their log-softmax, its gradient and the softmax (measured: 4 copies)
    out["logits"] = 4 * b * T * _split(cfg.vocab_size, t) * 4
    # AdamW's update of each trained weight: new moments and the update before donation
    # lets them replace the old ones (measured: 3 copies in float32). It runs after the
    # backward pass has freed the activations, logits and gathered weights; an accelerator's
    # buffer assignment reuses them, so only what it needs beyond those adds to the peak
    # (XLA:TPU: 70B LoRA, replicated adapters, 2.3 GiB of them). A CPU process's peak
    # (RssAnon, measured) counts them in full.
    update = 3 * trainable_elems * 4
    if devices.platform != "cpu":
        update = max(0, update - out["activations"] - out["logits"]
                     - out.get("FSDP gathered weights", 0))
    out["optimizer step temporaries"] = update
    if devices.platform == "cpu":
        out["runtime (Python, XLA)"] = CPU_RUNTIME_BYTES // devices.count
        # orbax copies what a checkpoint holds to host memory while it saves it
        out["checkpoint save copy"] = out["gradients"] // (2 if task.grad_accum > 1 else 1) \
            + out["AdamW moments"]
        out["compiled code"] = 2 * CPU_CODE_BYTES // devices.count  # train and eval steps
    return out


def estimate(cfg: ModelConfig, task: Task, devices: Devices, mesh: dict[str, int],
             quantization: str) -> dict[str, int]:
    if task.name in ("sft", "lora"):
        return training_bytes(cfg, task, devices, mesh, quantization)
    return inference_bytes(cfg, task, devices, mesh, quantization)
