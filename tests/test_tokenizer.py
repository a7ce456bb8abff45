import json

import pytest

from llama2_jax import DialogError, StreamDecoder, encode_dialog
from tests.conftest import GOLDEN

GOLDEN_LINES = [json.loads(line) for line in open(GOLDEN)]


def test_tokenizer_is_metas(tokenizer):
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (32000, 1, 2)
    assert tokenizer.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]


@pytest.mark.parametrize("i", range(len(GOLDEN_LINES)))
def test_golden_chat_format(tokenizer, i):
    case = GOLDEN_LINES[i]
    if "error" in case:
        expected = {"special_tags": "reserved tag", "roles": "roles must",
                    "last_not_user": "last message"}[case["error"]]
        with pytest.raises(DialogError, match=expected):
            encode_dialog(tokenizer, case["dialog"])
    else:
        assert encode_dialog(tokenizer, case["dialog"]) == case["tokens"]


def test_golden_file_covers_all_cases():
    kinds = {c.get("error", "ok") for c in GOLDEN_LINES}
    assert kinds == {"ok", "special_tags", "roles", "last_not_user"}


def test_malformed_dialogs(tokenizer):
    with pytest.raises(DialogError, match="empty dialog"):
        encode_dialog(tokenizer, [])
    with pytest.raises(DialogError, match="'role' and 'content'"):
        encode_dialog(tokenizer, [{"role": "user"}])
    with pytest.raises(DialogError, match="last message must be the user's, got 'system'"):
        encode_dialog(tokenizer, [{"role": "system", "content": "s"}])


def test_stream_decoder_never_splits_characters(tokenizer):
    text = "Ünïcödé: naïve café — 東京 🦙 done"
    ids = tokenizer.encode(text, bos=False)
    assert any(tokenizer.sp.id_to_piece(i).startswith("<0x") for i in ids)  # byte fallback
    dec = StreamDecoder(tokenizer)
    pieces = [dec.push([i]) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_missing_tokenizer_names_path(tmp_path):
    from llama2_jax import Tokenizer
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model: not a SentencePiece model"):
        Tokenizer(bad)
