"""SFT training-step speed of llama2_jax next to PyTorch (HF transformers + torch AdamW).

  python benchmarks/bench_sft.py                   # CPU: BENCH_134M, fp32, 4 x 256 tokens a step
  python benchmarks/bench_sft.py --memory_7b       # + the compiled 7B LoRA step's memory plan
  python benchmarks/bench_sft.py --gpu             # accelerator: 7B LoRA step tok/s and MFU

CPU mode builds one random BENCH_134M model (dim 768, 12 layers, vocab 32000, fp32), copies its
weights into a `LlamaForCausalLM` and times, in this one process and alternating which side goes
first in each repetition, a full fine-tuning step on the same batch:
  ours   `train_step.make_train_step` jitted as the app runs it: forward with segment masks,
         cross-entropy on weighted targets, backward, global-norm clipping, AdamW (optax),
         parameters and optimizer state donated.
  torch  `model(inputs).logits`, the same cross-entropy, `backward()`, `clip_grad_norm_`,
         `torch.optim.AdamW.step()` (the default for-each implementation), `zero_grad()`.
Both: fp32, same hyper-parameters, every target weighted. tok/s = batch x length / median
step seconds. The first step's loss of both sides is printed: the same weights and batch must
give the same loss (a check that both do the same work).

`--memory_7b`: the jitted LoRA step of configs/sft_7b_lora.py (bf16 base, rank 16 on all seven
projections, remat, micro-batch 2 x 1024) for LLAMA2_7B shapes, from abstract arguments
(nothing allocated): the bytes of its arguments (base, adapters, optimizer state, batch) plus
the temporaries of XLA's memory plan for the same step compiled for the CPU in fp32 (see
`memory_7b` for why fp32). An estimate of an accelerator's peak, not a measurement.

GPU mode: the same 7B LoRA step with random weights on the device; tok/s and MFU, counting
4 x parameters + attention FLOPs a token (forward, backward to activations; no weight gradients
of the frozen base; remat's extra forward not counted).
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import pin_threads, hf_model_from, median  # noqa: E402
from llama2_jax.model import checkpoint  # noqa: E402
from llama2_jax import finetune  # noqa: E402
from llama2_jax.training import lora, train_step  # noqa: E402
from llama2_jax.model.config import BENCH_134M, LLAMA2_7B  # noqa: E402
from llama2_jax.model.transformer import abstract_model, param_count  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("threads", os.cpu_count(), "CPU threads for torch and XLA:CPU.")
flags.DEFINE_integer("reps", 3, "Repetitions; medians are reported.")
flags.DEFINE_integer("steps", 4, "Timed steps per repetition and side.")
flags.DEFINE_integer("batch", 4, "Sequences per step.")
flags.DEFINE_integer("length", 256, "Tokens per sequence.")
flags.DEFINE_bool("memory_7b", False, "Also print the compiled 7B LoRA step's memory plan.")
flags.DEFINE_bool("gpu", False, "7B LoRA on the accelerator instead of the CPU comparison.")
flags.DEFINE_string("json", "", "Also write every number to this JSON file.")


def _hparams(**overrides):
    c = finetune.base_config()
    c.learning_rate, c.warmup_steps, c.steps, c.weight_decay = 1e-4, 0, 1000, 0.1
    c.update(overrides)
    return c


def _batch(cfg, batch: int, length: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.vocab_size, (batch, length + 1), dtype=np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:],
            "weights": np.ones((batch, length), np.float32),
            "segments": np.ones((batch, length), np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))}


class Ours:
    name = "llama2_jax"

    def __init__(self, model, batch):
        hp = _hparams()
        graphdef, state = nnx.split(abstract_model(model.config))
        self.params = jax.tree.map(jnp.copy, checkpoint.params_of(model))
        self.tx, _ = train_step.make_optimizer(hp, self.params)
        self.opt = self.tx.init(self.params)
        step = train_step.make_train_step(graphdef, state, self.tx, lora_scale_=None, remat=False)
        self.step_fn = jax.jit(step, donate_argnums=(0, 2))
        self.batch = {k: jnp.asarray(v)[None] for k, v in batch.items()}

    def step(self) -> float:
        self.params, self.opt, metrics = self.step_fn(self.params, {}, self.opt, self.batch)
        return float(metrics["loss"])  # waits for the step


class Torch:
    name = "torch"

    def __init__(self, model, batch):
        import torch
        hp = _hparams()
        self.torch = torch
        self.model = model.train()
        self.opt = torch.optim.AdamW(model.parameters(), lr=hp.learning_rate, betas=(hp.b1, hp.b2),
                                     eps=hp.eps, weight_decay=hp.weight_decay)
        self.inputs = torch.from_numpy(batch["inputs"].astype(np.int64))
        self.targets = torch.from_numpy(batch["targets"].astype(np.int64))

    def step(self) -> float:
        torch = self.torch
        logits = self.model(self.inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 self.targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def run_cpu() -> dict:
    import torch
    pin_threads(FLAGS.threads)
    torch.set_num_threads(FLAGS.threads)
    cfg = BENCH_134M
    model = checkpoint.random_model(cfg, checkpoint.default_mesh(cfg, jax.devices()[:1]))
    batch = _batch(cfg, FLAGS.batch, FLAGS.length)
    hf = hf_model_from(jax.tree.map(np.asarray, checkpoint.params_of(model)), cfg)
    sides = [Ours(model, batch), Torch(hf, batch)]
    first_loss = {s.name: s.step() for s in sides}  # also compiles / warms up
    for s in sides:
        s.step()
    times = {s.name: [] for s in sides}
    for rep in range(FLAGS.reps):
        for s in (sides if rep % 2 == 0 else sides[::-1]):
            for _ in range(FLAGS.steps):
                t0 = time.perf_counter()
                s.step()
                times[s.name].append(time.perf_counter() - t0)
    tokens = FLAGS.batch * FLAGS.length
    out = {"command": " ".join(["benchmarks/bench_sft.py", *sys.argv[1:]]),
           "date": datetime.date.today().isoformat(), "model": "BENCH_134M",
           "params": param_count(model), "batch": FLAGS.batch, "length": FLAGS.length,
           "threads": FLAGS.threads, "first_step_loss": first_loss,
           "step_s": {k: median(v) for k, v in times.items()},
           "tok_s": {k: tokens / median(v) for k, v in times.items()}}
    out["ratio"] = out["tok_s"]["llama2_jax"] / out["tok_s"]["torch"]
    return out


def lora_7b_step(config_overrides=None, dtype="bfloat16"):
    """The jitted sft_7b_lora step and its abstract arguments, in `dtype`."""
    from llama2_jax.cli import load_config_file
    c = load_config_file(os.path.join(ROOT, "configs", "sft_7b_lora.py"))
    c.update(config_overrides or {})
    cfg = LLAMA2_7B.replace(dtype=dtype, param_dtype=dtype)
    graphdef, state = nnx.split(abstract_model(cfg))
    frozen = nnx.to_pure_dict(state)
    scale = lora.lora_scale(c)
    trainable = jax.eval_shape(lambda p: lora.init_adapters(p, tuple(c.lora.targets),
                                                                c.lora.rank, 0), frozen)
    tx, _ = train_step.make_optimizer(c, trainable)
    opt = jax.eval_shape(tx.init, trainable)
    micro = c.batch_size // c.grad_accum
    spec = jax.ShapeDtypeStruct((c.grad_accum, micro, c.seq_len), jnp.int32)
    batch = {k: spec for k in ("inputs", "targets", "segments", "positions")}
    batch["weights"] = jax.ShapeDtypeStruct(spec.shape, jnp.float32)
    step = jax.jit(train_step.make_train_step(graphdef, state, tx, lora_scale_=scale,
                                            remat=c.remat), donate_argnums=(0, 2))
    return step, (trainable, frozen, opt, batch), c


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def memory_7b() -> dict:
    """Bytes of the bf16 step's arguments, and XLA's temporaries for the step compiled in fp32.

    XLA:CPU has no bf16 matmul: compiling the bf16 step for the CPU converts the whole stacked
    base to fp32 outside the layer loop (27 GB of temporaries that no accelerator would
    allocate), so the temporaries come from the fp32 compile, an upper bound of the bf16 ones.
    """
    gib = 1 << 30
    _, args, c = lora_7b_step(dtype="bfloat16")
    arg_bytes = _nbytes(args)
    step, args32, _ = lora_7b_step(dtype="float32")
    t0 = time.perf_counter()
    m = step.lower(*args32).compile().memory_analysis()
    # The same with the base in int8 (config quantization="int8"): weights + per-channel scales.
    from llama2_jax.model import quant
    q_base = jax.eval_shape(lambda p: quant.quantize_params(p, "int8"), args[1])
    int8_bytes = arg_bytes - _nbytes(args[1]) + _nbytes(q_base)
    return {"lora_params": sum(x.size for x in jax.tree.leaves(args[0])),
            "compile_s": time.perf_counter() - t0,
            "bf16_argument_gib": arg_bytes / gib,
            "int8_base_argument_gib": int8_bytes / gib,
            "fp32_compile_temp_gib": m.temp_size_in_bytes / gib,
            "estimate_gib": (arg_bytes + m.temp_size_in_bytes) / gib,
            "estimate_int8_base_gib": (int8_bytes + m.temp_size_in_bytes) / gib,
            "micro_batch": f"{c.batch_size // c.grad_accum} x {c.seq_len}",
            "grad_accum": c.grad_accum}


def run_gpu() -> dict:
    step, (trainable, frozen, opt, batch), c = lora_7b_step()
    cfg = LLAMA2_7B.replace(dtype="bfloat16", param_dtype="bfloat16")
    model = checkpoint.random_model(cfg, checkpoint.default_mesh(cfg))
    frozen = checkpoint.params_of(model)
    del model
    trainable = lora.init_adapters(frozen, tuple(c.lora.targets), c.lora.rank, 0)
    tx, _ = train_step.make_optimizer(c, trainable)
    opt = tx.init(trainable)
    host = _batch(cfg, c.batch_size, c.seq_len)
    batch = {k: jnp.asarray(v.reshape(c.grad_accum, -1, c.seq_len)) for k, v in host.items()}
    trainable, opt, m = step(trainable, frozen, opt, batch)
    float(m["loss"])
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        trainable, opt, m = step(trainable, frozen, opt, batch)
        float(m["loss"])
        times.append(time.perf_counter() - t0)
    tokens = c.batch_size * c.seq_len
    n = LLAMA2_7B.num_params()
    flops_per_token = 4 * n + 4 * LLAMA2_7B.n_layers * c.seq_len * LLAMA2_7B.dim
    s = statistics.median(times)
    peak = {"H100": 989e12, "H200": 989e12}
    kind = jax.devices()[0].device_kind
    peak_flops = next((v for k, v in peak.items() if k in kind), float("nan"))
    return {"command": " ".join(["benchmarks/bench_sft.py", *sys.argv[1:]]),
            "date": datetime.date.today().isoformat(), "device": kind, "step_s": s,
            "tok_s": tokens / s, "mfu": flops_per_token * tokens / s / peak_flops,
            "memory_gib": jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0) / 2**30}


def main(argv):
    del argv
    out = run_gpu() if FLAGS.gpu else run_cpu()
    if FLAGS.memory_7b:
        out["memory_7b_lora"] = memory_7b()
    print(json.dumps(out, indent=2))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    app.run(main)
