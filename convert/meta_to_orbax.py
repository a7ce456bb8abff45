"""Convert Meta's Llama 2 download (consolidated.NN.pth + params.json) into a llama2_jax checkpoint.

  python -m convert.meta_to_orbax --input_dir=llama-2-7b --output_dir=ckpt/llama2-7b

Shards (1 for 7B, 2 for 13B, 8 for 70B) are merged tensor by tensor from memory-mapped files, so
memory stays around one layer's weights whatever the model size. The output loads onto any mesh
with `llama2_jax.load(output_dir)`.
"""

from __future__ import annotations

import sys
import time


from absl import app, flags

from convert import common, orbax_io, verify
from convert.sources import MetaSource
from llama2_jax.model.config import ConfigError

FLAGS = flags.FLAGS


def convert(input_dir: str, output_dir: str, *, dtype: str | None = None,
            tokenizer: str | None = None, skip_checksum: bool = False, overwrite: bool = False,
            verify_logits: bool = False, progress: bool = True,
            quantization: str = "none") -> float | None:
    """Convert; returns the --verify logits difference (None without verify)."""
    start = time.perf_counter()
    common.check_output(output_dir, overwrite)  # before the slow checks of the input
    common.check_verify(verify_logits, quantization)
    source = MetaSource(input_dir, tokenizer=common.find_tokenizer(input_dir, tokenizer),
                        skip_checksum=skip_checksum, progress=progress)
    orbax_io.write_checkpoint(source, output_dir, dtype=dtype, overwrite=overwrite,
                              progress=progress, start=start, quantization=quantization)
    if verify_logits:
        return verify.compare(output_dir, lambda: verify.reference_from_source(source))
    return None


def main(argv):
    del argv
    common.quiet_logs()
    try:
        convert(FLAGS.input_dir, FLAGS.output_dir, dtype=FLAGS.dtype, tokenizer=FLAGS.tokenizer,
                skip_checksum=FLAGS.skip_checksum, overwrite=FLAGS.overwrite,
                verify_logits=FLAGS.verify, progress=FLAGS.progress,
                quantization=FLAGS.quantization)
    except (common.ConversionError, ConfigError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    common.define_import_flags("Meta checkpoint directory (consolidated.NN.pth, params.json, "
                               "optionally checklist.chk).", "the same weights")
    flags.DEFINE_bool("skip_checksum", False, "Do not verify the md5 sums of checklist.chk.")
    flags.adopt_module_key_flags(common)  # --help lists the shared flags too
    app.run(main)
