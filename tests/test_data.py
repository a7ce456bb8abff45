"""The SFT data pipeline: chat-format tokens and loss mask, bad lines, packing, seeded order."""

import json

import numpy as np
import pytest

from llama2_jax.training import data
from llama2_jax.training.data import DataError
from llama2_jax.tokenizer import encode_dialog

SYS = {"role": "system", "content": "Be brief."}
DIALOG = [SYS, {"role": "user", "content": "Hi there"},
          {"role": "assistant", "content": " Hello! How can I help? "},
          {"role": "user", "content": "Count to 3"},
          {"role": "assistant", "content": "1, 2, 3."}]


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_training_tokens_are_what_the_chat_app_sends(tokenizer):
    tokens, loss = data.encode_for_training(tokenizer, DIALOG)
    # The chat app's ids for the same history plus a new user turn start with these ids.
    sent = encode_dialog(tokenizer, DIALOG + [{"role": "user", "content": "next"}])
    assert sent[:len(tokens)] == tokens
    answers = [t for t, m in zip(tokens, loss) if m]
    # Loss on each answer and its EOS only: never on BOS, the system prompt or the questions.
    assert answers.count(tokenizer.eos_id) == 2 and tokenizer.bos_id not in answers
    assert tokenizer.decode(answers).split() == ["Hello!", "How", "can", "I", "help?", "1,",
                                                 "2,", "3."]
    first_eos = tokens.index(tokenizer.eos_id)
    assert loss[first_eos] and loss[first_eos + 1] is False  # the 2nd turn's BOS


def test_prompt_completion_lines_equal_messages(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "Hi", "completion": "Hello.", "system": "Be brief."},
        {"messages": [SYS, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}]}, ""])
    a, b = data.read_jsonl(path, tokenizer, max_length=64)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.loss, b.loss)
    assert a.source.endswith("d.jsonl:1") and b.source.endswith("d.jsonl:2")


@pytest.mark.parametrize("line, words", [
    ("{not json", ["d.jsonl:2", "not valid JSON"]),
    ('["a list"]', ["d.jsonl:2", "JSON object"]),
    ({"text": "hi"}, ["d.jsonl:2", "'messages'", "'prompt'", "['text']"]),
    ({"prompt": "hi"}, ["d.jsonl:2", "lacks 'completion'"]),
    ({"messages": [{"role": "robot", "content": "hi"}]},
     ["d.jsonl:2", "unknown role 'robot'", "system, user, assistant"]),
    ({"messages": [{"role": "user", "content": "hi"}]},
     ["d.jsonl:2", "last message must be the assistant's"]),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, ["d.jsonl:2", "['assistant']"]),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     ["d.jsonl:2", "content must be a string"]),
    ({"messages": [{"role": "user", "content": "[INST] hi"},
                   {"role": "assistant", "content": "x"}]}, ["d.jsonl:2", "[INST]"]),
    ({"messages": []}, ["d.jsonl:2", "empty dialog"]),
])
def test_bad_lines_name_file_line_and_reason(tmp_path, tokenizer, line, words):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "completion": "fine"}, line])
    with pytest.raises(DataError) as e:
        data.read_jsonl(path, tokenizer, max_length=64)
    for w in words:
        assert w in str(e.value)


def test_missing_file_and_bad_policy(tmp_path, tokenizer):
    with pytest.raises(DataError, match="not found"):
        data.read_jsonl(tmp_path / "none.jsonl", tokenizer, max_length=64)
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match="'truncate' or 'drop'"):
        data.read_jsonl(path, tokenizer, max_length=64, policy="cut")
    with pytest.raises(DataError, match="no training examples"):
        data.Batches([], batch_size=2, seq_len=8, packing=True, seed=0)


def test_over_long_examples_are_truncated_or_dropped_and_counted(tmp_path, tokenizer):
    long = {"prompt": "hi", "completion": "word " * 50}
    short = {"prompt": "hi", "completion": "ok"}
    no_answer_left = {"prompt": "word " * 40, "completion": "ok"}
    path = write_jsonl(tmp_path / "d.jsonl", [long, short, no_answer_left])
    stats = data.Stats()
    kept = data.read_jsonl(path, tokenizer, max_length=32, policy="truncate", stats=stats)
    assert [len(e) for e in kept] == [32, len(kept[1])] and len(kept[1]) < 32
    assert (stats.examples, stats.truncated, stats.dropped) == (2, 2, 1)
    stats = data.Stats()
    kept = data.read_jsonl(path, tokenizer, max_length=32, policy="drop", stats=stats)
    assert len(kept) == 1 and (stats.truncated, stats.dropped) == (0, 2)
    assert "2 dropped" in str(stats)


def _examples(tokenizer, n=7):
    return [data.Example(*map(np.asarray, data.encode_for_training(tokenizer, [
        {"role": "user", "content": f"Question {i}?" + " more" * i},
        {"role": "assistant", "content": f"Answer {i}."}])), source=str(i)) for i in range(n)]


def test_packing_keeps_each_example_whole_with_its_own_positions(tokenizer):
    examples = _examples(tokenizer)
    packed = data.pack(examples, seq_len=48, packing=True)
    single = data.pack(examples, seq_len=48, packing=False)
    assert len(single["inputs"]) == len(examples) > len(packed["inputs"])
    got = []
    for rows in (packed,):
        for r in range(len(rows["inputs"])):
            for s in range(1, rows["segments"][r].max() + 1):
                cols = rows["segments"][r] == s
                np.testing.assert_array_equal(rows["positions"][r, cols], np.arange(cols.sum()))
                got.append((list(rows["inputs"][r, cols]), list(rows["targets"][r, cols]),
                            list(rows["weights"][r, cols])))
    want = [(list(e.tokens[:-1]), list(e.tokens[1:]), list(e.loss[1:].astype(np.float32)))
            for e in examples]
    assert got == want
    assert not packed["weights"][packed["segments"] == 0].any()
    mask = data.segment_mask(packed["segments"][:1])
    assert not mask[0][packed["segments"][0] == 1][:, packed["segments"][0] == 2].any()


def test_batches_are_seeded_and_resume_from_their_position(tokenizer):
    examples = _examples(tokenizer, 9)
    kw = dict(batch_size=3, seq_len=32, packing=False)
    a = data.Batches(examples, seed=1, **kw)
    first = [next(a) for _ in range(7)]  # 21 rows: spans three epochs of 9
    b = data.Batches(examples, seed=1, **kw)
    for _ in range(4):
        next(b)
    c = data.Batches(examples, seed=1, **kw)
    c.seek(b.position)
    assert b.position == {"epoch": 1, "row": 3}
    for want in first[4:]:
        got = next(c)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    other = next(data.Batches(examples, seed=2, **kw))
    assert not np.array_equal(other["inputs"], first[0]["inputs"])
    # Each epoch is a permutation: every example once.
    epoch0 = np.concatenate([f["inputs"] for f in first[:3]])
    assert len({tuple(r) for r in epoch0}) == 9


def test_split_is_seeded_and_disjoint(tokenizer):
    examples = _examples(tokenizer, 10)
    train, held = data.split(examples, 0.2, seed=3)
    assert len(held) == 2 and len(train) == 8
    assert {e.source for e in train}.isdisjoint({e.source for e in held})
    assert [e.source for e in data.split(examples, 0.2, seed=3)[1]] == [e.source for e in held]
    with pytest.raises(DataError, match="eval_fraction"):
        data.split(examples, 1.0, seed=0)


def test_eval_batches_cover_every_example_once(tokenizer):
    examples = _examples(tokenizer, 5)
    batches = data.eval_batches(examples, batch_size=2, seq_len=32, packing=False)
    assert len(batches) == 3
    weights = sum(b["weights"].sum() for b in batches)
    assert weights == sum(e.loss[1:].sum() for e in examples)
