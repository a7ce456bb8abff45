"""Export a llama2_jax LoRA adapter to Hugging Face PEFT's format.

  python -m convert.adapter_to_peft --adapter_dir=runs/my-sft/final_adapter \
      --output_dir=my-sft-peft --base_model_name_or_path=meta-llama/Llama-2-7b-chat-hf

Writes adapter_config.json (peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, target_modules,
base_model_name_or_path) and adapter_model.safetensors with PEFT's names and torch layouts:
`base_model.model.model.layers.{i}.<module>.lora_A.weight` [r, in] and `lora_B.weight`
[out, r], the rows of q_proj's and k_proj's B permuted to HF's rotate-half RoPE as
convert/orbax_to_hf.py permutes the base's q/k. PEFT's scale lora_alpha / r is the adapter's
alpha / rank, so alpha and rank are written as they are. Load the result on the base exported by
convert/orbax_to_hf.py:
`PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(hf_dir), output_dir)`.
Adapters are small (rank x (in + out) numbers per weight and layer): read whole, not streamed.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags

from convert import common, mapping
from convert.orbax_to_hf import SafetensorsFile
from llama2_jax.model import adapter, sharding
from llama2_jax.model.checkpoint import CheckpointError
from llama2_jax.model.config import ConfigError

FLAGS = flags.FLAGS
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def define_flags():
    """The command line (defined only when run as a script, so that tests can import
    several converters)."""
    flags.DEFINE_string("adapter_dir", None, "llama2_jax adapter directory (a LoRA run's "
                        "final_adapter/).")
    flags.DEFINE_string("output_dir", None, "PEFT adapter directory to create.")
    flags.DEFINE_string("base_model_name_or_path", None, "The Hugging Face base model to name in "
                        "adapter_config.json (default: the adapter's base: its Hugging Face name "
                        "when imported from PEFT, else its llama2_jax checkpoint path).")
    flags.DEFINE_enum("dtype", None, list(common.DTYPES),
                      "Weight dtype to write (default: the adapter's, float32 after training).")
    flags.DEFINE_bool("overwrite", False, "Replace output_dir if it exists.")


def peft_config(ad: adapter.Adapter, base_model_name_or_path: str | None) -> dict:
    """adapter_config.json for `ad`: plain LoRA on every layer of the targeted modules."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(ad.rank),
        "lora_alpha": float(ad.alpha),
        "target_modules": sorted(mapping.peft_module(t).split(".")[-1] for t in ad.targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
    }


def peft_tensors(ad: adapter.Adapter, dtype=None) -> dict[str, np.ndarray]:
    """PEFT's tensor name -> array, every layer of every target."""
    cfg = ad.base_config
    out = {}
    for t in ad.targets:
        ab = ad.params["layers"][adapter.TARGETS[t][0]][t]
        a, b = np.asarray(ab["a"]), np.asarray(ab["b"])  # [L, in, r], [L, r, out]
        for layer in range(cfg.n_layers):
            names = mapping.peft_names(t, layer)
            out.update(zip(names, mapping.lora_to_peft(t, a[layer], b[layer], cfg, dtype)))
    return out


def export(adapter_dir: str, output_dir: str, *, base_model_name_or_path: str | None = None,
           dtype: str | None = None, overwrite: bool = False) -> str:
    """Write the PEFT directory; returns the summary line."""
    start = time.perf_counter()
    common.check_output(output_dir, overwrite)
    ad = adapter.load(adapter_dir, mesh=sharding.make_mesh(devices=jax.devices()[:1]))
    stored = np.dtype(jax.tree.leaves(ad.params)[0].dtype)
    tensors = peft_tensors(ad, common.output_dtype(dtype, stored))
    name = base_model_name_or_path or ad.base.get("name")
    note = ""
    if not name:
        name = ad.base.get("checkpoint_dir")
        note = (" (a llama2_jax checkpoint: pass --base_model_name_or_path to name its Hugging "
                "Face export)")
    with common.staged_output(output_dir, overwrite) as tmp:
        f = SafetensorsFile(os.path.join(tmp, WEIGHTS_FILE),
                            [(n, x.shape, x.dtype) for n, x in tensors.items()])
        for n, x in tensors.items():
            f.tensor(n)[...] = x
        f.close()
        with open(os.path.join(tmp, CONFIG_FILE), "w") as cf:
            json.dump(peft_config(ad, name), cf, indent=2)
    n_params = sum(x.size for x in tensors.values())
    line = (f"exported a rank-{ad.rank} LoRA adapter on {', '.join(ad.targets)} to PEFT: "
            f"{n_params:,} parameters, {time.perf_counter() - start:.1f} s -> "
            f"{os.path.abspath(output_dir)}\n  base_model_name_or_path: {name}{note}")
    print(line, flush=True)
    return line


def main(argv):
    del argv
    common.quiet_logs()
    try:
        export(FLAGS.adapter_dir, FLAGS.output_dir,
               base_model_name_or_path=FLAGS.base_model_name_or_path, dtype=FLAGS.dtype,
               overwrite=FLAGS.overwrite)
    except (common.ConversionError, CheckpointError, ConfigError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["adapter_dir", "output_dir"])
    app.run(main)
