"""Convert a Hugging Face Llama 2 model directory into a llama2_jax checkpoint.

  python -m convert.hf_to_orbax --input_dir=Llama-2-7b-hf --output_dir=ckpt/llama2-7b

Reads config.json and the safetensors (lazily, `safe_open`) or .bin (`torch.load(mmap=True,
weights_only=True)`) shards tensor by tensor, un-permutes q/k from HF's rotate-half RoPE layout
back to Meta's interleaved one, and handles tied or untied output embeddings.
"""

from __future__ import annotations

import sys
import time


from absl import app, flags

from convert import common, orbax_io, verify
from convert.sources import HFSource
from llama2_jax.model.config import ConfigError

FLAGS = flags.FLAGS


def convert(input_dir: str, output_dir: str, *, dtype: str | None = None,
            tokenizer: str | None = None, overwrite: bool = False, verify_logits: bool = False,
            progress: bool = True, quantization: str = "none") -> float | None:
    """Convert; returns the --verify logits difference (None without verify)."""
    start = time.perf_counter()
    common.check_output(output_dir, overwrite)  # before the slow checks of the input
    common.check_verify(verify_logits, quantization)
    source = HFSource(input_dir, tokenizer=common.find_tokenizer(input_dir, tokenizer))
    orbax_io.write_checkpoint(source, output_dir, dtype=dtype, overwrite=overwrite,
                              progress=progress, start=start, quantization=quantization)
    if verify_logits:
        return verify.compare(output_dir, lambda: verify.reference_from_dir(input_dir))
    return None


def main(argv):
    del argv
    common.quiet_logs()
    try:
        convert(FLAGS.input_dir, FLAGS.output_dir, dtype=FLAGS.dtype, tokenizer=FLAGS.tokenizer,
                overwrite=FLAGS.overwrite, verify_logits=FLAGS.verify, progress=FLAGS.progress,
                quantization=FLAGS.quantization)
    except (common.ConversionError, ConfigError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    common.define_import_flags("Hugging Face model directory (config.json + weights).",
                               "the input directory")
    flags.adopt_module_key_flags(common)  # --help lists the shared flags too
    app.run(main)
