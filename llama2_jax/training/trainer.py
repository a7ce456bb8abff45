"""A fine-tuning run: state, compiled steps, the loop, checkpoints and the export. The app
around it is llama2_jax.finetune; steps, adapters and data: llama2_jax.training.train_step,
.lora, .data."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from llama2_jax.model import adapter, checkpoint, quant, sharding
from llama2_jax import distributed
from llama2_jax.model.config import DTYPES
from llama2_jax.model.transformer import abstract_model
from llama2_jax.training import data
from llama2_jax.training.data import DataError
from llama2_jax.training.events import EventWriter
from llama2_jax.training.lora import (LORA_TARGETS, init_adapters, lora_scale, merge_adapters,
                                      unquantized_base, unquantized_base_exists)
from llama2_jax.training.train_step import (bind, make_eval_step, make_optimizer,
                                            make_train_step, shardings_like)

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
EVENTS_DIR = "events"  # TensorBoard: tensorboard --logdir <output_dir>/events
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
# A LoRA run's adapters on their own (llama2_jax.model.adapter), beside the merged final/.
ADAPTER_DIR = "final_adapter"
# Settings a resumed run may change without changing what it computes.
_RESUMABLE_CHANGES = {"steps", "save_every", "eval_every", "log_every", "keep_checkpoints",
                      "compilation_cache_dir", "multihost", "progress", "coordinator_address",
                      "num_processes", "process_id", "distributed_timeout_s", "heartbeat_timeout_s"}


class FinetuneError(ValueError):
    """A fine-tuning setting or state that cannot work; the message says which and why."""


class NonFiniteLoss(FinetuneError):
    """Loss or gradient became NaN/inf; the last checkpoint is the last good state."""


# -- LoRA settings ---------------------------------------------------------------------------
def check_lora(lora) -> None:
    if lora.rank < 0:
        raise FinetuneError(f"lora.rank={lora.rank}: expected 0 (full fine-tuning) or a rank > 0")
    if lora.rank:
        bad = [t for t in lora.targets if t not in LORA_TARGETS]
        if bad or not lora.targets:
            raise FinetuneError(f"lora.targets={tuple(lora.targets)}: expected a non-empty subset "
                                f"of {', '.join(LORA_TARGETS)}")


# -- the run ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Progress:
    """What a run has done: saved in every checkpoint, and all that resuming needs besides
    the arrays (the data order and the LoRA init follow from `seed`)."""

    step: int = 0
    data: dict = dataclasses.field(default_factory=lambda: {"epoch": 0, "row": 0})
    seed: int = 0
    tokens: int = 0


class Trainer:
    """One fine-tuning run of `config` (llama2_jax.finetune.base_config's fields) on the model,
    tokenizer, mesh and weight format that llama2_jax.settings.prepare checked (`prepared`);
    `run()` trains to `config.steps` and exports."""

    def __init__(self, config: ml_collections.ConfigDict, prepared, err: TextIO = sys.stderr):
        self.config = c = config
        self.err = err
        self.out = os.path.abspath(os.path.expanduser(c.output_dir))
        self.lora_scale = lora_scale(c) if c.lora.rank else None
        self._stop_signal: int | None = None
        self.base_dir = prepared.checkpoint_dir
        if prepared.checkpoint_dir:
            _check_not_inside(self.out, os.path.abspath(prepared.checkpoint_dir))
        self.base_cfg = prepared.model_config
        self.tokenizer = prepared.tokenizer
        self.tokenizer_path = os.path.abspath(prepared.tokenizer.path)
        self.mesh, self.quantization = prepared.mesh, prepared.quantization
        self.dtype = prepared.dtype
        if c.seq_len > self.base_cfg.max_seq_len:
            raise FinetuneError(f"seq_len={c.seq_len} exceeds the model's max_seq_len="
                                f"{self.base_cfg.max_seq_len}")
        micro, processes = c.batch_size // c.grad_accum, jax.process_count()
        if micro % processes:
            raise FinetuneError(f"the micro-batch of {micro} sequences (batch_size="
                                f"{c.batch_size} / grad_accum={c.grad_accum}) does not divide "
                                f"over {processes} processes")
        self.cfg = self.base_cfg.replace(dtype=jnp.dtype(self.dtype).name,
                                         param_dtype=jnp.dtype(c.param_dtype).name)
        self._load_data()

    # -- data
    def _load_data(self) -> None:
        c = self.config
        self.stats = data.Stats()
        examples = data.read_jsonl(c.train_data, self.tokenizer, max_length=c.seq_len + 1,
                                   policy=c.max_length_policy, stats=self.stats)
        if not examples:
            raise DataError(f"{c.train_data}: no usable examples ({self.stats})")
        if c.eval_data:
            self.eval_stats = data.Stats()
            eval_examples = data.read_jsonl(c.eval_data, self.tokenizer,
                                            max_length=c.seq_len + 1, policy=c.max_length_policy,
                                            stats=self.eval_stats)
            if not eval_examples:
                raise DataError(f"{c.eval_data}: no usable examples ({self.eval_stats})")
        else:
            examples, eval_examples = data.split(examples, c.eval_fraction, c.seed)
            if not examples:
                raise DataError(f"{c.train_data}: eval_fraction={c.eval_fraction} leaves no "
                                "training examples")
        self.batches = data.Batches(examples, batch_size=c.batch_size, seq_len=c.seq_len,
                                    packing=c.packing, seed=c.seed)
        self.eval_set = data.eval_batches(eval_examples, batch_size=c.batch_size // c.grad_accum,
                                          seq_len=c.seq_len, packing=c.packing)
        self.n_train, self.n_eval = len(examples), len(eval_examples)

    # -- state
    def _init_state(self):
        c = self.config
        abstract = abstract_model(self.cfg)
        self.graphdef, self.state = nnx.split(abstract)
        self.param_shardings = checkpoint.param_shardings(abstract, self.mesh)
        if c.checkpoint_dir:
            model = checkpoint.load(c.checkpoint_dir, mesh=self.mesh, dtype=c.param_dtype,
                                    quantization=self.quantization)
        else:
            model = quant.quantize_model(checkpoint.random_model(self.cfg, self.mesh, seed=c.seed),
                                         self.quantization)
        params = checkpoint.params_of(model)
        del model
        replicated = NamedSharding(self.mesh, P())
        if self.lora_scale is None:
            trainable, frozen = params, {}
            self.trainable_shardings, self.frozen_shardings = self.param_shardings, {}
        else:
            init = jax.jit(lambda p: init_adapters(p, tuple(c.lora.targets), c.lora.rank,
                                                   c.seed), out_shardings=replicated)
            trainable, frozen = init(params), params
            self.trainable_shardings = jax.tree.map(lambda _: replicated, trainable)
            # As loaded (8-bit weights' scales are sharded with them).
            self.frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
        self.tx, self.schedule = make_optimizer(c, trainable)
        opt_abstract = jax.eval_shape(self.tx.init, trainable)
        self.opt_shardings = shardings_like(opt_abstract, self.trainable_shardings, self.mesh)
        opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(trainable)
        return trainable, frozen, opt_state

    def _compile(self) -> None:
        c = self.config
        batch_spec = NamedSharding(self.mesh, P(None, *sharding.logical_to_spec(
            ("batch", None), (c.batch_size // c.grad_accum, c.seq_len), self.mesh)))
        self.batch_sharding = batch_spec
        replicated = NamedSharding(self.mesh, P())
        step = make_train_step(self.graphdef, self.state, self.tx,
                               lora_scale_=self.lora_scale, remat=c.remat)
        self.train_step = jax.jit(
            step, in_shardings=(self.trainable_shardings, self.frozen_shardings,
                                self.opt_shardings, batch_spec),
            out_shardings=(self.trainable_shardings, self.opt_shardings, replicated),
            donate_argnums=(0, 2))
        eval_spec = NamedSharding(self.mesh, P(*batch_spec.spec[1:]))
        self.eval_step = jax.jit(
            make_eval_step(self.graphdef, self.state, lora_scale_=self.lora_scale),
            in_shardings=(self.trainable_shardings, self.frozen_shardings, eval_spec),
            out_shardings=replicated)

    def _manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=self.config.keep_checkpoints,
                                               create=True)
        return ocp.CheckpointManager(os.path.join(self.out, CHECKPOINTS_DIR), options=options)

    def _save(self, manager, trainable, opt_state, progress: Progress) -> None:
        manager.save(progress.step, args=ocp.args.Composite(
            trainable=ocp.args.StandardSave(trainable),
            opt_state=ocp.args.StandardSave(opt_state),
            progress=ocp.args.JsonSave(dataclasses.asdict(progress))), force=True)

    def _restore(self, manager, step: int, trainable, opt_state):
        def target(tree, shardings):
            return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                tree, shardings)
        restored = manager.restore(step, args=ocp.args.Composite(
            trainable=ocp.args.StandardRestore(target(trainable, self.trainable_shardings)),
            opt_state=ocp.args.StandardRestore(target(opt_state, self.opt_shardings)),
            progress=ocp.args.JsonRestore()))
        return restored.trainable, restored.opt_state, Progress(**restored.progress)

    # -- the loop
    def run(self) -> dict:
        """Train (or resume) to `config.steps`, then export `final/` (and LoRA's `final_adapter/`).

        Returns a summary: steps, final loss and eval loss, the final checkpoint's path.
        """
        c = self.config
        final = os.path.join(self.out, FINAL_DIR)
        if os.path.exists(os.path.join(final, checkpoint.META_FILE)):
            self._say(f"{final} already exists: this run is complete (use a new output_dir to "
                      "train again)")
            return {"final": final, "steps": c.steps, "resumed": True, "complete": True}
        self._claim_output_dir()
        trainable, frozen, opt_state = self._init_state()
        self._compile()
        manager = self._manager()
        progress = Progress(seed=c.seed)
        resumed = manager.latest_step() is not None
        if resumed:
            trainable, opt_state, progress = self._restore(manager, manager.latest_step(),
                                                           trainable, opt_state)
            self.batches.seek(progress.data)
            self._say(f"resuming from step {progress.step} ({manager.directory})")
        self._say(self._describe(trainable))

        last = {}
        previous = signal.signal(signal.SIGTERM, self._on_signal)
        try:
            main = sharding.is_main_process()
            metrics_path = os.path.join(self.out, METRICS_FILE) if main else os.devnull
            with jax.set_mesh(self.mesh), open(metrics_path, "a") as mf, \
                    contextlib.ExitStack() as stack:
                tb = stack.enter_context(EventWriter(os.path.join(self.out, EVENTS_DIR))) \
                    if main else None
                t0, tokens0 = time.perf_counter(), 0
                while progress.step < c.steps:
                    host_batch = next(self.batches)
                    batch = self._device_batch(host_batch)
                    trainable, opt_state, metrics = self.train_step(trainable, frozen,
                                                                    opt_state, batch)
                    progress.step += 1
                    progress.data = self.batches.position
                    n_tokens = int(np.count_nonzero(host_batch["segments"]))
                    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
                    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                        saved = manager.latest_step()
                        raise NonFiniteLoss(
                            f"step {progress.step}: loss {loss}, grad norm {grad_norm}; stopped. "
                            + (f"The last good checkpoint (step {saved}) is intact in "
                               f"{manager.directory}." if saved is not None else
                               "No checkpoint was saved yet.")
                            + " Lower learning_rate or check the data.")
                    progress.tokens += n_tokens
                    tokens0 += n_tokens
                    last = {"step": progress.step, "loss": loss, "grad_norm": grad_norm,
                            "lr": float(self.schedule(progress.step - 1))}
                    done = progress.step == c.steps
                    if c.eval_every and (progress.step % c.eval_every == 0 or done):
                        last["eval_loss"] = self.evaluate(trainable, frozen)
                    if progress.step % c.log_every == 0 or done or "eval_loss" in last:
                        elapsed = time.perf_counter() - t0
                        last["tokens_per_s"] = tokens0 / elapsed if elapsed > 0 else 0.0
                        t0, tokens0 = time.perf_counter(), 0
                        mf.write(json.dumps(last) + "\n")
                        mf.flush()
                        if tb is not None:
                            tb.scalars(progress.step, {k: v for k, v in last.items()
                                                       if k != "step" and math.isfinite(v)})
                        self._log(last)
                    self._bar(progress.step, last)
                    stop = self._stop_signal is not None
                    if stop or done or progress.step % c.save_every == 0:
                        self._save(manager, trainable, opt_state, progress)
                    if stop:
                        manager.wait_until_finished()
                        self._say(f"\nstopped by signal {self._stop_signal} after step "
                                  f"{progress.step}; checkpoint saved. Run the same command to "
                                  "resume.")
                        return {"steps": progress.step, "stopped": True, **last}
            manager.wait_until_finished()
            if self.lora_scale is not None and unquantized_base_exists(
                    c.checkpoint_dir, self.quantization, ADAPTER_DIR, self._say):
                del frozen  # the 4/8-bit base goes before the unquantized one comes
                frozen = unquantized_base(c.checkpoint_dir, self.mesh, self.base_cfg.weight_dtype)
            self._export(trainable, frozen, final)
        finally:
            signal.signal(signal.SIGTERM, previous)
            manager.close()
        adapter_dir = os.path.join(self.out, ADAPTER_DIR) if self.lora_scale else None
        self._say(f"\nfine-tuned model written to {final}"
                  + (f" (the adapters alone: {adapter_dir})" if adapter_dir else "")
                  + f"; chat with it:\n  python -m llama2_jax.chat --config "
                  f"configs/llama2_7b_chat.py --config.checkpoint_dir={final}")
        return {"final": final, "adapter": adapter_dir, "steps": progress.step,
                "resumed": resumed, **last}

    def evaluate(self, trainable, frozen) -> float:
        """Mean token loss over the eval set (nan when there is none)."""
        if not self.eval_set:
            return float("nan")
        total = weight = 0.0
        for batch in self.eval_set:
            lsum, w = self.eval_step(trainable, frozen, self._device_batch(batch, micro=False))
            total, weight = total + float(lsum), weight + float(w)
        return total / max(weight, 1.0)

    def _device_batch(self, batch: dict, micro: bool = True) -> dict:
        c = self.config
        if micro:
            batch = {k: v.reshape(c.grad_accum, -1, *v.shape[1:]) for k, v in batch.items()}
            target = self.batch_sharding
        else:
            target = NamedSharding(self.mesh, P(*self.batch_sharding.spec[1:]))
        # Every process builds the same global batch; each device takes its own slice.
        return {k: jax.make_array_from_callback(v.shape, target, lambda i, v=v: v[i])
                for k, v in batch.items()}

    def _export(self, trainable, frozen, final: str) -> None:
        if self.lora_scale is not None:  # before final/, whose marker says the run is done
            c = self.config
            base = adapter.base_record(self.base_cfg, self.base_dir, self.quantization,
                                       **({} if self.base_dir else {"seed": c.seed}))
            adapter.save(os.path.join(self.out, ADAPTER_DIR), adapter.Adapter(
                trainable, c.lora.rank, c.lora.alpha, base), overwrite=True)
        out_dtype = self.base_cfg.weight_dtype
        params = (trainable if self.lora_scale is None
                  else merge_adapters(frozen, trainable, self.lora_scale, out_dtype))
        params = quant.dequantize_params(params, out_dtype)  # quantized weights LoRA left
        params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(out_dtype), p),
                         out_shardings=self.param_shardings)(params)
        graphdef, state = nnx.split(abstract_model(self.base_cfg))
        checkpoint.save(final, bind(graphdef, state, params), tokenizer_path=self.tokenizer_path)

    # -- the output directory
    def _claim_output_dir(self) -> None:
        """Create output_dir with run.json, or check that an existing one is this run's
        (process 0; the others stop with its error)."""
        distributed.on_main("claim_output_dir", self._claim)

    def _claim(self) -> None:
        settings = self.config.to_dict()
        path = os.path.join(self.out, RUN_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                before = json.load(f)
            changed = sorted(k for k in set(before) | set(settings)
                             if k not in _RESUMABLE_CHANGES
                             and _jsonable(before.get(k)) != _jsonable(settings.get(k)))
            if changed:
                raise FinetuneError(
                    f"{self.out} holds a run with other settings ({', '.join(changed)} differ: "
                    + "; ".join(f"{k}: was {before.get(k)!r}, now {settings.get(k)!r}"
                                for k in changed[:4])
                    + "); use a new output_dir, or the same settings to resume")
            return
        if os.path.isdir(self.out) and os.listdir(self.out):
            raise FinetuneError(f"output_dir {self.out} exists and is not a fine-tuning run "
                                f"(no {RUN_FILE}); refusing to write into it")
        os.makedirs(self.out, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(_jsonable(settings), f, indent=2)
        os.replace(path + ".tmp", path)

    # -- reporting
    def _describe(self, trainable) -> str:
        c, m = self.config, self.cfg
        n_train = sum(x.size for x in jax.tree.leaves(trainable))
        what = (f"LoRA rank {c.lora.rank} on {', '.join(c.lora.targets)}" if self.lora_scale
                else "all weights")
        return (f"fine-tuning {c.checkpoint_dir or 'a random ' + c.model_preset + ' model'}: "
                f"dim {m.dim}, {m.n_layers} layers; training {what} ({n_train:,} parameters), "
                f"compute {m.dtype}, weights {m.param_dtype}"
                f"{'' if self.quantization == 'none' else ', base in ' + self.quantization}\n"
                f"  data: {c.train_data}: {self.stats}; {self.n_train} train / {self.n_eval} eval"
                f" examples; {c.batch_size} x {c.seq_len} tokens a step"
                f"{', packed' if c.packing else ''}\n"
                f"  mesh {', '.join(f'{k}={v}' for k, v in self.mesh.shape.items())}; "
                f"output {self.out}")

    def _say(self, text: str) -> None:
        if sharding.is_main_process():
            self.err.write(text + "\n")
            self.err.flush()

    def _log(self, m: dict) -> None:
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in m.items())
        if sharding.is_main_process():
            end = "\n" if not self._tty() else "\x1b[K\n"
            self.err.write(("\r" if self._tty() else "") + text + end)
            self.err.flush()

    def _tty(self) -> bool:
        return bool(self.config.progress) and hasattr(self.err, "isatty") and self.err.isatty()

    def _bar(self, step: int, last: dict) -> None:
        if not self._tty() or not sharding.is_main_process():
            return
        width = 30
        done = int(width * step / self.config.steps)
        self.err.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{self.config.steps} "
                       f"loss {last.get('loss', float('nan')):.4f}\x1b[K")
        self.err.flush()

    def _on_signal(self, signum, frame) -> None:
        del frame
        self._stop_signal = signum


def check_settings(c) -> None:
    """Raise FinetuneError for settings that cannot work, before anything is loaded."""
    if not c.output_dir:
        raise FinetuneError("output_dir is required")
    if not c.train_data:
        raise FinetuneError("train_data is required (a JSONL file of dialogs)")
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "save_every", "log_every",
                 "keep_checkpoints"):
        if int(c[name]) < 1:
            raise FinetuneError(f"{name}={c[name]}: expected a positive integer")
    if c.batch_size % c.grad_accum:
        raise FinetuneError(f"batch_size={c.batch_size} is not a multiple of grad_accum="
                            f"{c.grad_accum}")
    if c.eval_every < 0 or c.warmup_steps < 0 or c.learning_rate <= 0:
        raise FinetuneError("eval_every and warmup_steps must be >= 0 and learning_rate > 0")
    for name in ("dtype", "param_dtype"):
        if c[name] and c[name] not in DTYPES:
            raise FinetuneError(f"{name}={c[name]!r}: expected one of {', '.join(DTYPES)}")
    if not c.param_dtype:
        raise FinetuneError(f"param_dtype is required: one of {', '.join(DTYPES)}")
    check_lora(c.lora)


def _check_not_inside(output_dir: str, base_dir: str) -> None:
    out, base = os.path.realpath(output_dir), os.path.realpath(base_dir)
    if out == base or out.startswith(base + os.sep) or base.startswith(out + os.sep):
        raise FinetuneError(f"output_dir {output_dir} and checkpoint_dir {base_dir} overlap; the "
                            "base checkpoint is never written into: choose another output_dir")


def _jsonable(x: Any):
    return json.loads(json.dumps(x, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))

