"""Ahead-of-time checks for TPUs, on any host: the steps the apps run, lowered on abstract inputs
for the devices of a named TPU topology and compiled by XLA:TPU's own compiler (libtpu: the
`tpu` extra), which reports each step's memory and cost. Nothing executes; no TPU is needed.

  from llama2_jax import aot
  devices = aot.topology("v5e:2x4")                   # a v5e-8's 8 chips
  mesh = aot.mesh_on(devices, {"data": 1, "fsdp": 1, "tensor": 8})
  for r in aot.serve_steps(LLAMA2_7B.with_dtype("bfloat16"), mesh, slots=16, length=4096):
      print(r.name, r.args_bytes, r.temp_bytes, r.bytes_accessed)

Topologies are libtpu's names: "v5e:2x2", "v5e:2x4", "v4:2x2x1", "v5p:2x2x1", "v6e:2x4",
"v3:2x2" (4 chips, 8 cores), "v2:2x2"; one chip is "v5e:1x1" (Colab's TPU runtime).

The steps are the real ones: `Slots` (llama2_jax.inference.slots) built over abstract weights
lowers the decode / prefill / commit / extract / insert steps it would compile, and the
fine-tuning step is llama2_jax.training.train_step's, sharded as the Trainer shards it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llama2_jax import hlo_traffic
from llama2_jax.inference.slots import Slots
from llama2_jax.inference.weights import Weights
from llama2_jax.model import checkpoint, kv_cache, sharding
from llama2_jax.model.config import ModelConfig
from llama2_jax.model.transformer import rope_angles
from llama2_jax.training.lora import init_adapters
from llama2_jax.training.train_step import make_optimizer, make_train_step, shardings_like


class AotError(RuntimeError):
    """No TPU compiler here (libtpu missing), or a topology it does not know."""


@dataclasses.dataclass(frozen=True)
class StepReport:
    """What XLA says of one compiled step: bytes on one device, cost of the whole step."""

    name: str
    args_bytes: int  # inputs (weights, caches, state) on one device
    output_bytes: int
    alias_bytes: int  # outputs that reuse donated inputs
    temp_bytes: int  # the step's temporaries on one device
    code_bytes: int
    flops: float  # cost analysis: a loop body (the scanned layers) is counted once
    bytes_accessed: float
    hbm_bytes: int = 0  # what crosses HBM, from the compiled HLO (llama2_jax.hlo_traffic)

    @property
    def peak_bytes(self) -> int:
        """Arguments, temporaries and the outputs that do not reuse an argument."""
        return self.args_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes


def topology(name: str) -> list:
    """The devices of TPU topology `name` ("v5e:2x4"), from libtpu's topology description."""
    m = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)*)", name)
    if not m:
        raise AotError(f"topology {name!r}: expected '<generation>:<chips>' like 'v5e:2x4'")
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover
        raise AotError(f"jax.experimental.topologies unavailable: {e}") from None
    # Nothing here runs on a TPU: another process holding libtpu (a test run, a second
    # check) must not lock this one out.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {}
    if all(d == "1" for d in m.group(2).split("x")):  # one chip: libtpu needs the host's bounds
        kwargs["chips_per_host_bounds"] = (1, 1, 1)
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs)
    except Exception as e:  # noqa: BLE001 -- libtpu missing, or the name unknown to it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AotError(f"no XLA:TPU compiler for topology {name!r} here ({first}); it needs "
                       "libtpu: pip install -e '.[tpu]'") from None
    return list(desc.devices)


def mesh_on(devices: Sequence, mesh: dict[str, int]) -> Mesh:
    """A (data, fsdp, tensor) mesh (a plan's mesh dict) over `devices`."""
    return sharding.make_mesh(mesh.get("data", 1), mesh.get("fsdp", 1), mesh.get("tensor", 1),
                              devices=devices)


def report(name: str, lowered) -> StepReport:
    """Compile `lowered` and read its memory and cost analysis."""
    # Not through JAX's persistent compilation cache: an executable for a topology's devices
    # cannot be loaded back without a TPU client.
    cached = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        compiled = lowered.compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", cached)
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
    return StepReport(name, int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                      int(m.alias_size_in_bytes), int(m.temp_size_in_bytes),
                      int(m.generated_code_size_in_bytes), float(cost.get("flops", 0.0)),
                      float(cost.get("bytes accessed", 0.0)),
                      hlo_traffic.hbm_bytes(compiled.as_text()))


def abstract_slots(cfg: ModelConfig, mesh: Mesh, *, slots: int, length: int,
                   quantization: str = "none", chunk: int = 256, logprobs: bool = True,
                   unstack: bool | None = None, kv_quantization: str = "none",
                   fuse: bool = False) -> Slots:
    """Slots over abstract weights on `mesh`: nothing allocated, for `Slots.lower_steps`.
    unstack None: the layout the mesh's platform runs (per-layer on CPU, scanned elsewhere);
    fuse: as `Weights(fuse=...)` (the Engine's layout; the server's is unfused)."""
    model = checkpoint.abstract_model_on(cfg, mesh, quantization)
    if unstack is None:
        unstack = mesh.devices.flat[0].platform == "cpu"
    return Slots(Weights(model, mesh, unstack=unstack, fuse=fuse), slots, length, chunk=chunk,
                 logprobs=logprobs, abstract=True, kv_quantization=kv_quantization)


def serve_steps(cfg: ModelConfig, mesh: Mesh, *, slots: int, length: int,
                quantization: str = "none", chunk: int = 256, every: bool = False,
                logprobs: bool = True, unstack: bool | None = None,
                cost: bool = True, kinds: Sequence[str] = (),
                kv_quantization: str = "none") -> list[StepReport]:
    """The server's (slots > 1) or the chat's (slots = 1) steps, compiled for `mesh`'s devices.

    every False: the largest step of each kind only (the most rows and positions, the longest
    chunk, all blocks): where a step's memory peaks. True: every step a warm-up compiles.
    cost: the flops and bytes accessed of all the layers (one more small compile per step
    shape); False: as the compiler counts them (the layer loop's body once).
    kinds: only these ("decode", "prefill", "commit", "extract", "insert"; () all).
    """
    s = abstract_slots(cfg, mesh, slots=slots, length=length, quantization=quantization,
                       chunk=chunk, logprobs=logprobs, unstack=unstack,
                       kv_quantization=kv_quantization)
    steps = [(name, lowered) for name, lowered in s.lower_steps(every=every)
             if not kinds or name.split(" ")[0] in kinds]
    reports = [report(name, lowered) for name, lowered in steps]
    if not cost or s.weights.per_layer:
        return reports
    # Cost analysis counts the scanned layers' loop body once: the other L - 1 layers' cost
    # is that of one layer's step lowered alone, at the step's shapes.
    out, layer_costs = [], {}
    for r, (name, _) in zip(reports, steps):
        shape = _layer_shape(name, s)
        if shape is None:
            out.append(r)
            continue
        if shape not in layer_costs:
            layer_costs[shape] = layer_report(cfg, mesh, s.shapes, *shape,
                                              quantization=quantization,
                                              kv_quantization=kv_quantization)
        one = layer_costs[shape]
        more = cfg.n_layers - 1
        out.append(dataclasses.replace(
            r, flops=r.flops + more * one.flops,
            bytes_accessed=r.bytes_accessed + more * one.bytes_accessed,
            hbm_bytes=r.hbm_bytes + more * one.hbm_bytes))
    return out


def _layer_shape(name: str, s: Slots) -> tuple[int, int, int, bool] | None:
    """(rows, tokens, attend, staging) of a decode / prefill step named by lower_steps."""
    m = re.fullmatch(r"decode (\d+) rows, attend (\d+)", name)
    if m:
        return int(m.group(1)), 1, int(m.group(2)), False
    m = re.fullmatch(r"prefill (\d+) tokens, attend (\d+)", name)
    if m:
        return 1, int(m.group(1)), int(m.group(2)), not s.shared_stage
    return None


def layer_report(cfg: ModelConfig, mesh: Mesh, shapes, rows: int, tokens: int, attend: int,
                 staging: bool, quantization: str = "none",
                 kv_quantization: str = "none") -> StepReport:
    """One layer of a decode (tokens=1) or prefill step over `shapes`' cache (the one-row
    staging cache where `staging`), its weights and cache as arguments: the loop body whose
    cost a scanned step counts once."""
    model = checkpoint.abstract_model_on(cfg, mesh, quantization)
    graphdef, stacked = nnx.split(model.layers)

    def drop_layers(t):
        spec = t.sharding.spec
        return jax.ShapeDtypeStruct(t.shape[1:], t.dtype, sharding=NamedSharding(
            mesh, P(*spec[1:])))
    weights = jax.tree.map(drop_layers, stacked)
    groups = (1,) if staging else shapes.groups
    cache = jax.eval_shape(lambda: kv_cache.init_blocks(
        None, groups, shapes.blocks, cfg.n_kv_heads, cfg.head_dim, cfg.compute_dtype,
        kv_quantization))
    cache = kv_cache.map_arrays(lambda x, axes: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=sharding.named_sharding(mesh, axes, x.shape)), cache)
    x = jax.ShapeDtypeStruct((rows, tokens, cfg.dim), cfg.compute_dtype,
                             sharding=sharding.named_sharding(mesh, ("batch", "length", None),
                                                              (rows, tokens, cfg.dim)))
    positions = jax.ShapeDtypeStruct((rows, tokens), jnp.int32,
                                     sharding=NamedSharding(mesh, P()))

    def layer(weights, x, positions, cache):
        block = nnx.merge(graphdef, weights)
        cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
        return block(x, positions, cos, sin, None, cache, None, attend, True)

    with jax.set_mesh(mesh):
        return report(f"one layer, {rows} rows x {tokens} tokens, attend {attend}",
                      jax.jit(layer).lower(weights, x, positions, cache))


def train_step(cfg: ModelConfig, mesh: Mesh, *, batch: int, seq_len: int, grad_accum: int = 1,
               quantization: str = "none", lora_rank: int = 0,
               lora_targets: Sequence[str] = ("wq", "wk", "wv", "wo"), remat: bool = True,
               param_dtype: str = "float32") -> StepReport:
    """The fine-tuning step (full or LoRA over a `quantization` base) compiled for `mesh`,
    sharded as llama2_jax.training.trainer.Trainer shards it."""

    # AdamW with clipping, as fine-tuning runs it (the values change no buffer)
    c = ml_collections.ConfigDict(dict(learning_rate=1e-4, warmup_steps=10, steps=100,
                                       final_lr_ratio=0.1, clip_norm=1.0, b1=0.9, b2=0.999,
                                       eps=1e-8, weight_decay=0.0))
    cfg = cfg.replace(param_dtype=param_dtype)
    model = checkpoint.abstract_model_on(cfg, mesh, quantization)
    params = checkpoint.params_of(model)
    graphdef, state = nnx.split(model)
    replicated = NamedSharding(mesh, P())
    if lora_rank:
        scale = 1.0
        trainable = jax.eval_shape(lambda p: init_adapters(p, tuple(lora_targets), lora_rank, 0),
                                   params)
        trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                sharding=replicated), trainable)
        frozen = params
    else:
        scale, trainable, frozen = None, params, {}
    tx, _ = make_optimizer(c, trainable)
    opt = jax.eval_shape(tx.init, trainable)
    trainable_sh = jax.tree.map(lambda x: x.sharding, trainable)
    opt_sh = shardings_like(opt, trainable_sh, mesh)
    opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt,
                       opt_sh)
    micro = batch // grad_accum
    spec = NamedSharding(mesh, P(None, *sharding.logical_to_spec(("batch", None),
                                                                  (micro, seq_len), mesh)))
    ids = jax.ShapeDtypeStruct((grad_accum, micro, seq_len), jnp.int32, sharding=spec)
    batch_ = {"inputs": ids, "targets": ids, "positions": ids, "segments": ids,
              "weights": jax.ShapeDtypeStruct(ids.shape, jnp.float32, sharding=spec)}
    step = make_train_step(graphdef, state, tx, lora_scale_=scale, remat=remat)
    fn = jax.jit(step, out_shardings=(trainable_sh, opt_sh, replicated), donate_argnums=(0, 2))
    kind = f"LoRA r{lora_rank}" if lora_rank else "full"
    name = (f"train {kind}, {quantization} base, {batch} x {seq_len}"
            f"{f' in {grad_accum} micro-batches' if grad_accum > 1 else ''}")
    with jax.set_mesh(mesh):
        return report(name, fn.lower(trainable, frozen, opt, batch_))



# -- a plan, checked by the compiler -----------------------------------------------------------
# JAX devices of the planner's TPU kinds -> libtpu topology names (v2/v3: 2 cores per chip).
_TOPOLOGIES = {("tpu-v5e", 1): "v5e:1x1", ("tpu-v5e", 4): "v5e:2x2", ("tpu-v5e", 8): "v5e:2x4",
               ("tpu-v6e", 1): "v6e:1x1", ("tpu-v6e", 4): "v6e:2x2", ("tpu-v6e", 8): "v6e:2x4",
               ("tpu-v4", 4): "v4:2x2x1", ("tpu-v4", 8): "v4:2x2x2",
               ("tpu-v5p", 4): "v5p:2x2x1", ("tpu-v5p", 8): "v5p:2x2x2",
               ("tpu-v3", 8): "v3:2x2", ("tpu-v2", 8): "v2:2x2"}


def topology_for(kind: str, count: int) -> str:
    """The topology name of `count` JAX devices of the planner's `kind` ("tpu-v5e", 8)."""
    try:
        return _TOPOLOGIES[(kind, count)]
    except KeyError:
        known = ", ".join(f"{n} x {k}" for k, n in _TOPOLOGIES)
        raise AotError(f"no TPU topology known for {count} x {kind}; known: {known}") from None


def device_bytes(tree) -> int:
    """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        n = 1
        for d in shard:
            n *= d
        total += n * jnp.dtype(x.dtype).itemsize
    return total


@dataclasses.dataclass(frozen=True)
class CompiledPlan:
    """XLA's account of a plan: the arrays an app keeps (weights, caches, optimizer state) and
    the compiled steps; `total` is what one device holds at the peak."""

    topology: str
    resident_bytes: int  # held between steps, one device
    steps: list[StepReport]

    @property
    def total(self) -> int:
        # An extract's output is a prefix the prefix cache keeps: its budget (the plan's
        # "prefix cache", prefix_cache_mb), not a step's.
        extra = max((r.temp_bytes + r.output_bytes - r.alias_bytes for r in self.steps
                     if not r.name.startswith("extract")), default=0)
        return self.resident_bytes + extra


def check_plan(cfg: ModelConfig, plan) -> CompiledPlan:
    """Compile the steps of `plan` (llama2_jax.plan.Plan, for TPU devices) with XLA:TPU for
    its topology, mesh, dtype and weight format."""
    devices = plan.devices
    if devices.platform != "tpu":
        raise AotError(f"--compile needs TPU devices (the compiler here is XLA:TPU's), "
                       f"got {devices}")
    name = topology_for(devices.kind, devices.count)
    mesh = mesh_on(topology(name), plan.mesh)
    cfg = cfg.with_dtype(plan.dtype)
    task = plan.task
    if task.name in ("chat", "serve"):
        context = task.context or cfg.max_seq_len
        slots = task.slots if task.name == "serve" else 1
        s = abstract_slots(cfg, mesh, slots=slots, length=context,
                           quantization=plan.quantization, chunk=task.prefill_chunk,
                           kv_quantization=task.kv_quantization)
        resident = device_bytes((s.weights.leaves, s.cache, s.state)) + (
            0 if s.shared_stage else device_bytes(s.stage))
        # the chat keeps its conversation in its one slot: prefill and decode only (the
        # server's prefix cache also extracts and inserts)
        steps = [report(n, low) for n, low in s.lower_steps(every=False)
                 if task.name == "serve" or n.split(" ")[0] in ("prefill", "decode")]
        return CompiledPlan(name, resident, steps)
    r = train_step(cfg, mesh, batch=task.batch, seq_len=task.seq_len,
                   grad_accum=task.grad_accum, quantization=plan.quantization,
                   lora_rank=task.lora_rank if task.name == "lora" else 0,
                   lora_targets=task.lora_targets, remat=task.remat,
                   param_dtype=task.param_dtype)
    return CompiledPlan(name, r.args_bytes, [r])


def estimate_seconds(r: StepReport, kind: str) -> float:
    """A step's time on devices of `kind` (llama2_jax.devices.PEAKS) by the roofline:
    max(flops / peak FLOP/s, HBM bytes / bandwidth). An estimate from the compiler's counts, not
    a measurement: collectives and the time between steps are not in it."""
    from llama2_jax.devices import PEAKS
    if kind not in PEAKS:
        raise AotError(f"no peak figures for {kind!r}; known: {', '.join(PEAKS)}")
    flops, bandwidth = PEAKS[kind]
    return max(r.flops / flops, r.hbm_bytes / bandwidth)
