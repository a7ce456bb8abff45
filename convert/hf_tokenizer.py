"""A Hugging Face fast tokenizer directory (tokenizer.json + tokenizer_config.json) that
tokenizes exactly as Meta's SentencePiece model does, for the HF export (convert/orbax_to_hf.py)
and tools that load a tokenizer by directory (lm-evaluation-harness's `tokenizer=`). Why
transformers' own conversion will not do, and how this one is built: llama2_jax.tokenizer_json.
"""

from __future__ import annotations

import json
import os

from llama2_jax.tokenizer_json import fast_tokenizer


def save(model_file: str, out: str) -> None:
    """Write tokenizer.json and tokenizer_config.json for `model_file` into directory `out`."""
    import sentencepiece as spm
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=model_file)
    bos, eos, unk = (sp.IdToPiece(i) for i in (sp.bos_id(), sp.eos_id(), sp.unk_id()))
    PreTrainedTokenizerFast(tokenizer_object=fast_tokenizer(model_file), bos_token=bos,
                            eos_token=eos, unk_token=unk).save_pretrained(out)
    config_file = os.path.join(out, "tokenizer_config.json")
    with open(config_file) as f:
        config = json.load(f)
    # The class both transformers 4 and 5 load from tokenizer.json as it is (5's
    # LlamaTokenizer rebuilds it from tokenizer.model, with the faults above).
    config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True,
                  add_eos_token=False)
    config.pop("backend", None)
    with open(config_file, "w") as f:
        json.dump(config, f, indent=2)
