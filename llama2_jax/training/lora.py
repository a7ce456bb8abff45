"""LoRA: low-rank adapters on a frozen base, W + scale * a @ b, for llama2_jax.finetune.

A `LoRA` weight stands in for the base weight inside the model (it implements
llama2_jax.model.transformer.Weight: `linear()` calls its einsum), so one forward pass serves the
full
model, the adapted one and, after `merge_adapters`, the merged one. The base may be 8-bit
(a QArray); adapters are float32 and replicated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from llama2_jax.model import checkpoint
from llama2_jax.model.adapter import OverBase
from llama2_jax.model.adapter import TARGETS, merge_adapters  # noqa: F401 (re-exported)
from llama2_jax.model.transformer import linear

# The targets and the merge are the adapter format's (llama2_jax.model.adapter), which the
# apps that apply adapters read without the training code.
LORA_TARGETS = TARGETS


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoRA(OverBase):
    """A frozen weight plus a low-rank update, W + scale * a @ b, as `model.linear` takes it.

    `base` has the weight's own shape (reshaped by the model to its 2-D [in, out] view);
    `a` [in, r] and `b` [r, out] are always 2-D (a leading L axis when stacked).
    """

    base: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata=dict(static=True), default=1.0)

    def einsum(self, eq: str, x: jax.Array, out_dtype=None) -> jax.Array:
        # The contraction is over x's last axis, so the adapter path is two plain matmuls.
        y = linear(eq, x, jax.lax.stop_gradient(self.base), out_dtype)  # base may be 8-bit
        low = (x @ self.a.astype(x.dtype)) @ self.b.astype(x.dtype)  # [..., out]
        return y + (self.scale * low).astype(y.dtype)


def lora_scale(config) -> float:
    """alpha / rank: PEFT's lora_alpha / r (without rsLoRA), and `Adapter.scale`."""
    return float(config.lora.alpha) / int(config.lora.rank)


def init_adapters(params: dict, targets: Sequence[str], rank: int, seed: int) -> dict:
    """Adapters for `targets`: a ~ N(0, 1/in), b = 0, so the model starts as the base exactly."""
    out: dict = {}
    keys = jax.random.split(jax.random.key(seed), len(targets))
    for key, name in zip(keys, targets):
        module, n_in = LORA_TARGETS[name]
        w = params["layers"][module][name]  # [L, in..., out...]
        fan_in, fan_out = math.prod(w.shape[1:1 + n_in]), math.prod(w.shape[1 + n_in:])
        a = jax.random.normal(key, (w.shape[0], fan_in, rank), jnp.float32) * fan_in ** -0.5
        out.setdefault("layers", {}).setdefault(module, {})[name] = {
            "a": a, "b": jnp.zeros((w.shape[0], rank, fan_out), jnp.float32)}
    return out


def _with_adapters(params: dict, adapters: dict, fn: Callable) -> dict:
    out = jax.tree.map(lambda x: x, params)  # a new nested dict, same arrays
    for module, weights in adapters.get("layers", {}).items():
        for name, ab in weights.items():
            out["layers"][module][name] = fn(params["layers"][module][name], ab)
    return out


def apply_adapters(params: dict, adapters: dict, scale: float) -> dict:
    """`params` with each adapted weight replaced by its LoRA object (for training)."""
    return _with_adapters(params, adapters, lambda w, ab: LoRA(w, ab["a"], ab["b"], scale))


# -- the merge at the end of a run on a quantized base -----------------------------------------
def unquantized_base_exists(checkpoint_dir: str, quantization: str, adapter_dir: str,
                            say: Callable[[str], None]) -> bool:
    """Whether a LoRA run whose base was held in `quantization` merges its adapters into the
    base checkpoint's unquantized weights (it has them), not into their dequantized 4/8-bit
    copy, which would fold the quantization error into every weight of final/. Says so when
    it cannot."""
    if quantization == "none":
        return False
    if checkpoint_dir and checkpoint.read_meta(checkpoint_dir)[1] == "none":
        return True
    say(f"the base checkpoint holds no unquantized weights: final/ merges the adapters into its "
        f"dequantized {quantization} weights (the adapters alone are saved in {adapter_dir}/)")
    return False


def unquantized_base(checkpoint_dir: str, mesh, dtype) -> dict:
    model = checkpoint.load(checkpoint_dir, mesh=mesh, dtype=dtype, quantization="none")
    return checkpoint.params_of(model)
