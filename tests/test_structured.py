"""Structured output through the server (llguidance): JSON schemas, json_object, regex, choice
and Lark grammars, over real sockets with the `openai` client, from a random model sampling at
temperature 1, so only the grammar can make the answers parse.
"""

import concurrent.futures
import json
import re

import jsonschema
import numpy as np
import openai
import pytest

import llama2_jax
from llama2_jax.model import checkpoint
from llama2_jax.model.config import TINY
from tests.conftest import save_random, serving

CFG = TINY.replace(vocab_size=32000, max_seq_len=512)
MODEL = "tiny-structured"
ASK = [{"role": "user", "content": "Describe a llama as JSON."}]
SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3}},
     "required": ["color", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "null"}},
     "required": ["ok", "n"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, one_device_mesh):
    return save_random(tmp_path_factory, one_device_mesh, MODEL, CFG, seed=9)


@pytest.fixture(scope="module")
def server(tiny_dir):
    with serving(tiny_dir, MODEL, max_slots=4, context_length=256, prefill_chunk=32) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


def json_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def test_every_sampled_answer_validates_under_concurrency(server, client, tiny_dir, tokenizer,
                                                          one_device_mesh):
    """Two answers per schema at temperature 1, eight at once through four slots, beside a
    free greedy request that must stay the model's own."""
    ref = checkpoint.load(tiny_dir, mesh=one_device_mesh)
    free_ids = llama2_jax.encode_dialog(tokenizer, ASK)
    free_want = llama2_jax.generate(ref, [free_ids], max_new_tokens=20, temperature=0)[0]

    def ask(i):
        if i == len(SCHEMAS) * 2:
            r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=20,
                                               temperature=0,
                                               extra_body={"return_token_ids": True})
            return r.choices[0]
        return client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=120, temperature=1.0, top_p=1.0, seed=i,
            response_format=json_format(SCHEMAS[i % len(SCHEMAS)])).choices[0]

    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        answers = list(pool.map(ask, range(len(SCHEMAS) * 2 + 1)))
    free = answers.pop()
    assert free.token_ids == free_want[:len(free.token_ids)]
    for i, choice in enumerate(answers):
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[i % len(SCHEMAS)])
    assert len({c.message.content for c in answers}) > len(SCHEMAS)  # sampled, not fixed
    assert server.metric("llama2_jax_compiles_after_ready") == 0


def test_json_object_streamed(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=200, temperature=1.0, seed=3, stream=True,
        response_format={"type": "json_object"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # a random model may write a long object: then it is cut, and says so
        assert finish == "length" and text.startswith("{")


def test_regex_choice_and_lark_extensions(client):
    def complete(**extra):
        r = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=40,
                                      temperature=1.0, seed=5, extra_body=extra)
        return r.choices[0]

    for _ in range(2):
        c = complete(guided_regex=r"[0-9]{3}-[a-z]{2}")
        assert c.finish_reason == "stop" and re.fullmatch(r"[0-9]{3}-[a-z]{2}", c.text)
        c = complete(guided_choice=["yes", "no", "a llama"])
        assert c.finish_reason == "stop" and c.text in ("yes", "no", "a llama")
        c = complete(guided_grammar='start: "(" NUM ("+" NUM)~0..3 ")"\nNUM: /[0-9]{1,2}/')
        assert c.finish_reason == "stop" and re.fullmatch(r"\(\d{1,2}(\+\d{1,2}){0,3}\)", c.text)
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=40,
                                       temperature=1.0, seed=2,
                                       extra_body={"guided_json": SCHEMAS[1]})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMAS[1])


def test_max_tokens_cutting_json_short_says_length(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3,
                                       temperature=1.0, seed=1,
                                       response_format=json_format(SCHEMAS[0]))
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)


BAD = {
    "schema of an unknown type": ({"response_format": json_format({"type": "strin"})},
                                  "response_format", "does not compile"),
    "json_schema without a schema": ({"response_format": {"type": "json_schema"}},
                                     "response_format", "needs json_schema.schema"),
    "unknown format": ({"response_format": {"type": "xml"}}, "response_format",
                       "'xml' is not one of"),
    "bad regex": ({"guided_regex": "(ab"}, "guided_regex", "does not compile"),
    "bad lark": ({"guided_grammar": "start: NOPE"}, "guided_grammar", "does not compile"),
    "empty choice": ({"guided_choice": []}, "guided_choice", "non-empty list"),
    "guided_json not JSON": ({"guided_json": "{nope"}, "guided_json", "not valid JSON"),
    "two at once": ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice",
                    "give one structured-output parameter"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_grammars_are_a_400_and_disturb_nothing(server, client, case):
    extra, param, message = BAD[case]
    status, reply = server.post("/v1/chat/completions", {
        "model": MODEL, "messages": ASK, "max_tokens": 4, **extra})
    assert status == 400, reply
    assert reply["error"]["param"] == param and message in reply["error"]["message"], reply
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length"


def test_masked_logits_are_minus_infinity_only_off_the_mask():
    import jax.numpy as jnp
    from llama2_jax.inference.sampling import mask_rows
    logits = jnp.asarray(np.arange(2 * 70, dtype=np.float32).reshape(2, 70))
    allowed = np.zeros((2, 3), np.int32)
    allowed[0, 0] = 1 << 5
    allowed[0, 2] = 1 << 1  # token 65
    allowed[1] = -1  # row 1 unconstrained anyway
    got = np.asarray(mask_rows(logits, jnp.asarray([True, False]), jnp.asarray(allowed)))
    assert np.flatnonzero(np.isfinite(got[0])).tolist() == [5, 65]
    np.testing.assert_array_equal(got[1], np.asarray(logits[1]))
