"""Meta's SentencePiece model as a Hugging Face `tokenizers` tokenizer that tokenizes exactly as
SentencePiece does: for the HF export (convert/orbax_to_hf.py writes it as tokenizer.json) and
for llguidance's structured output (llama2_jax.serve.grammar).

transformers' own conversion (tokenizer.model -> tokenizer.json) differs from SentencePiece
wherever spaces repeat: it ranks merges by token id, while SentencePiece merges the pair whose
piece scores highest, and Llama 2's whitespace-only pieces ("▁▁" is id 259) score -1e9; and its
Metaspace pre-tokenizer adds no "▁" before a text that starts with a space, where
SentencePiece's dummy prefix always does (" Hello": [15043] against SentencePiece's
[29871, 15043]). So: BPE with the merges ranked by their piece's score, byte fallback, the
dummy prefix as a normalizer, BOS added by the post-processor.
"""

from __future__ import annotations


def fast_tokenizer(model_file: str):
    """A `tokenizers.Tokenizer` of the SentencePiece model file (BOS added to each text)."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    sp = spm.SentencePieceProcessor(model_file=model_file)
    vocab = {sp.IdToPiece(i): i for i in range(sp.vocab_size())}
    plain = {p for p, i in vocab.items()
             if not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i))}
    merges = sorted(((p[:k], p[k:], p) for p in plain for k in range(1, len(p))
                     if p[:k] in plain and p[k:] in plain),
                    key=lambda m: (-sp.GetScore(vocab[m[2]]), vocab[m[2]], len(m[0])))
    tok = Tokenizer(BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges],
                        unk_token=sp.IdToPiece(sp.unk_id()), fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    bos, eos, unk = (sp.IdToPiece(i) for i in (sp.bos_id(), sp.eos_id(), sp.unk_id()))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos_id())])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in (unk, bos, eos)])
    return tok
