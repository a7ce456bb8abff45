"""Import a Hugging Face PEFT LoRA adapter as a llama2_jax adapter.

  python -m convert.peft_to_adapter --input_dir=llama-2-7b-chat-my-lora \
      --base_dir=checkpoints/llama-2-7b-chat --output_dir=checkpoints/my-lora

Reads adapter_config.json and adapter_model.safetensors (PEFT's names, lora_A.weight [r, in]
and lora_B.weight [out, r]), un-permutes the rows of q_proj's and k_proj's B from HF's
rotate-half RoPE back to Meta's interleaved layout, and writes the adapter format that a LoRA
run writes (llama2_jax.model.adapter), naming `base_dir` as its base. Every tensor name and
shape is checked against the config and the base before anything is written. Plain LoRA only:
an adapter that needs more (DoRA, biases, modules_to_save, per-module ranks, some layers only)
is refused, naming the setting; rsLoRA's scale lora_alpha / sqrt(r) is kept by writing alpha =
lora_alpha * sqrt(r).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags

from convert import common, mapping
from convert.adapter_to_peft import CONFIG_FILE, WEIGHTS_FILE
from convert.sources import SourceError, check_names, check_tensor, to_numpy
from llama2_jax.model import adapter, checkpoint
from llama2_jax.model.checkpoint import CheckpointError
from llama2_jax.model.config import ConfigError

FLAGS = flags.FLAGS
# PEFT's target_modules name -> llama2_jax's target.
MODULES = {mapping.peft_module(t).split(".")[-1]: t for t in adapter.TARGETS}
# Settings that change what the adapter computes beyond plain LoRA; any value but these is
# refused.
PLAIN = {"use_dora": (False, None), "fan_in_fan_out": (False, None), "bias": ("none", None),
         "lora_bias": (False, None), "modules_to_save": (None, []),
         "layers_to_transform": (None, []), "rank_pattern": ({}, None),
         "alpha_pattern": ({}, None), "exclude_modules": (None, [], ""),
         "target_parameters": (None, []), "trainable_token_indices": (None, {}, []),
         "layer_replication": (None, []), "use_qalora": (False, None),
         "alora_invocation_tokens": (None, [])}


def define_flags():
    flags.DEFINE_string("input_dir", None, "PEFT adapter directory (adapter_config.json + "
                        "adapter_model.safetensors).")
    flags.DEFINE_string("base_dir", None, "The llama2_jax checkpoint of the base model the "
                        "adapter was trained on (e.g. converted by convert.hf_to_orbax).")
    flags.DEFINE_string("output_dir", None, "Adapter directory to create.")
    flags.DEFINE_enum("dtype", None, list(common.DTYPES),
                      "Weight dtype to write (default: the adapter's).")
    flags.DEFINE_bool("overwrite", False, "Replace output_dir if it exists.")


def read_config(input_dir: str) -> dict:
    """adapter_config.json, checked: returns {"targets", "rank", "alpha", "name"}."""
    path = os.path.join(input_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise SourceError(f"{input_dir}: no {CONFIG_FILE}; is this a PEFT adapter directory?")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}: not valid JSON ({e})") from None
    if config.get("peft_type") != "LORA":
        raise SourceError(f"{path}: peft_type {config.get('peft_type')!r}: only 'LORA' adapters "
                          "are read")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise SourceError(f"{path}: task_type {config['task_type']!r}: expected 'CAUSAL_LM'")
    for key, plain in PLAIN.items():
        if key in config and config[key] not in plain:
            raise SourceError(f"{path}: {key}={config[key]!r} is not supported (llama2_jax "
                              f"adapters are plain LoRA on every layer: {key} must be "
                              f"{plain[0]!r})")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1:
        raise SourceError(f"{path}: r={rank!r} is not a positive integer")
    if not isinstance(alpha, (int, float)):
        raise SourceError(f"{path}: lora_alpha={alpha!r} is not a number")
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # rsLoRA scales by lora_alpha / sqrt(r)
    modules = config.get("target_modules")
    if modules == "all-linear":  # PEFT: every linear layer but the output
        modules = list(MODULES)
    elif isinstance(modules, str):
        raise SourceError(f"{path}: target_modules={modules!r} is a regular expression; only a "
                          f"list of module names is read ({', '.join(MODULES)})")
    if not modules:
        raise SourceError(f"{path}: no target_modules")
    unknown = sorted(set(modules) - set(MODULES))
    if unknown:
        raise SourceError(f"{path}: target_modules names {', '.join(unknown)}, which llama2_jax "
                          f"cannot adapt (it adapts {', '.join(MODULES)})")
    targets = [t for t in adapter.TARGETS if t in {MODULES[m] for m in modules}]
    return {"targets": targets, "rank": rank, "alpha": alpha,
            "name": config.get("base_model_name_or_path")}


def read_params(input_dir: str, peft: dict, cfg, base_dir: str, dtype=None) -> dict:
    """adapter_model.safetensors as an Adapter's params, every name and shape checked first."""
    from safetensors import safe_open
    path = os.path.join(input_dir, WEIGHTS_FILE)
    if not os.path.isfile(path):
        old = os.path.isfile(os.path.join(input_dir, "adapter_model.bin"))
        raise SourceError(f"{input_dir}: no {WEIGHTS_FILE}" + (
            " (adapter_model.bin is not read: save the adapter with PEFT's default "
            "safe_serialization=True)" if old else ""))
    try:
        f = safe_open(path, framework="pt")
    except Exception as e:  # SafetensorError: truncated, bad header
        raise SourceError(f"{path}: cannot read as safetensors, truncated or corrupt? "
                          f"({e})") from None
    shapes = adapter.shapes(cfg, peft["targets"], peft["rank"])
    expected = {}  # name -> (target, layer, "A" | "B", torch shape)
    for t, (a_shape, b_shape) in shapes.items():
        for layer in range(cfg.n_layers):
            name_a, name_b = mapping.peft_names(t, layer)
            expected[name_a] = (t, layer, "A", (a_shape[2], a_shape[1]))  # [r, in]
            expected[name_b] = (t, layer, "B", (b_shape[2], b_shape[1]))  # [out, r]
    check_names(path, dict.fromkeys(f.keys(), path), expected)
    hint = f" (r={peft['rank']} in {CONFIG_FILE}, the base model in {base_dir})"
    params: dict = {}
    for t in shapes:
        a_layers, b_layers = [], []
        for layer in range(cfg.n_layers):
            tensors = []
            for name in mapping.peft_names(t, layer):
                s = f.get_slice(name)
                known = s.get_dtype() in ("F32", "F16", "BF16") or None
                check_tensor(path, name, s.get_shape(), known, expected[name][3], hint)
                tensors.append(to_numpy(f.get_tensor(name)))
            a, b = mapping.peft_to_lora(t, *tensors, cfg, dtype)
            a_layers.append(a)
            b_layers.append(b)
        mapping.set_path(params, ("layers", adapter.TARGETS[t][0], t),
                         {"a": np.stack(a_layers), "b": np.stack(b_layers)})
    return params


def convert(input_dir: str, base_dir: str, output_dir: str, *, dtype: str | None = None,
            overwrite: bool = False) -> str:
    """Write the llama2_jax adapter; returns the summary line."""
    start = time.perf_counter()
    common.check_output(output_dir, overwrite)
    cfg, stored = checkpoint.read_meta(base_dir)
    peft = read_config(input_dir)
    out_dtype = None if dtype is None else common.output_dtype(dtype, np.float32)
    params = read_params(input_dir, peft, cfg, base_dir, out_dtype)
    base = adapter.base_record(cfg, base_dir, stored, name=peft["name"])
    ad = adapter.Adapter(params, peft["rank"], peft["alpha"], base)
    adapter.save(output_dir, ad, overwrite=overwrite)
    n_params = sum(x.size for x in jax.tree.leaves(ad.params))
    line = (f"imported a rank-{ad.rank} LoRA adapter on {', '.join(ad.targets)} from PEFT: "
            f"{n_params:,} parameters, {time.perf_counter() - start:.1f} s -> "
            f"{os.path.abspath(output_dir)} (base {os.path.abspath(base_dir)})")
    print(line, flush=True)
    return line


def main(argv):
    del argv
    common.quiet_logs()
    try:
        convert(FLAGS.input_dir, FLAGS.base_dir, FLAGS.output_dir, dtype=FLAGS.dtype,
                overwrite=FLAGS.overwrite)
    except (common.ConversionError, CheckpointError, ConfigError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["input_dir", "base_dir", "output_dir"])
    app.run(main)
