"""The fine-tuning step: the loss on the assistant's tokens, AdamW with warmup + cosine decay
and clipping, gradient accumulation over micro-batches, LoRA or full training; jitted by
llama2_jax.finetune's Trainer.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llama2_jax.training import data
from llama2_jax.training.lora import apply_adapters
from llama2_jax.model.transformer import Transformer

def bind(graphdef, state, params: dict) -> Transformer:
    """The model with `params` (a pure dict; leaves may be LoRA objects) as its weights."""
    state = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def loss_sums(model: Transformer, batch: dict, remat: bool = False):
    """(sum of token cross-entropies weighted by batch["weights"], sum of weights)."""
    mask = data.segment_mask(batch["segments"])  # [B, T, T]
    logits, _ = model(batch["inputs"], batch["positions"], mask_extra=mask, remat=remat)
    logz = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    gold = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    w = batch["weights"]
    return jnp.sum((logz - gold) * w), jnp.sum(w)


def decay_mask(tree: dict) -> dict:
    """True where AdamW decays: not norms, not embeddings."""
    def keep(path, _):
        names = [str(getattr(k, "key", k)) for k in path]
        return not any(n.endswith("norm") or n == "tok_embeddings" for n in names)
    return jax.tree_util.tree_map_with_path(keep, tree)


def make_optimizer(config, trainable: dict) -> tuple[optax.GradientTransformation, Callable]:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
        decay_steps=max(config.steps, config.warmup_steps + 1),
        end_value=config.learning_rate * config.final_lr_ratio)
    parts = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm else []
    parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                             weight_decay=config.weight_decay, mask=decay_mask(trainable)))
    return optax.chain(*parts), schedule


def make_train_step(graphdef, state, tx, *, lora_scale_: float | None, remat: bool):
    """step(trainable, frozen, opt_state, batch) -> (trainable, opt_state, metrics).

    `batch` leaves are [grad_accum, micro_batch, T]; the micro-batches' gradients are summed
    and divided by the step's total loss weight, so accumulation changes nothing but memory.
    """
    def params_for(trainable, frozen):
        if lora_scale_ is None:
            return trainable
        return apply_adapters(frozen, trainable, lora_scale_)

    def step(trainable, frozen, opt_state, batch):
        def micro(carry, mb):
            grads, loss, weight = carry
            def f(p):
                return loss_sums(bind(graphdef, state, params_for(p, frozen)), mb, remat)
            (lsum, w), g = jax.value_and_grad(f, has_aux=True)(trainable)
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            return (grads, loss + lsum, weight + w), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
        (grads, loss, weight), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0), batch)
        denom = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": loss / denom, "grad_norm": optax.tree.norm(grads),
                   "loss_tokens": weight}
        return trainable, opt_state, metrics

    return step


def make_eval_step(graphdef, state, *, lora_scale_: float | None):
    def step(trainable, frozen, batch):
        params = trainable if lora_scale_ is None else apply_adapters(frozen, trainable,
                                                                      lora_scale_)
        return loss_sums(bind(graphdef, state, params), batch)
    return step


def shardings_like(tree, reference: dict, mesh: Mesh):
    """A sharding for each leaf of `tree` (e.g. optimizer state): the one of the parameter at
    the same dict path in `reference`, else replicated (step counts, scalars)."""
    by_path = {tuple(str(k.key) for k in path): s
               for path, s in jax.tree_util.tree_leaves_with_path(reference)}
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        keys = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        s = by_path.get(keys)
        return s if s is not None and getattr(leaf, "shape", ()) != () else replicated
    return jax.tree_util.tree_map_with_path(pick, tree)
