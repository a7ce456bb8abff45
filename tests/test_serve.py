"""`python -m llama2_jax.serve` over real sockets on 127.0.0.1, with the `openai` client.

The served model is a tiny random Llama with the real tokenizer, saved to a checkpoint that
this process loads too: every answer is checked against `llama2_jax.generate` / `forward` on
that prompt alone, and chat prompts against the golden ids of Meta's chat_completion.
"""

import concurrent.futures
import json
import random
import threading
import time

import httpx
import jax
import numpy as np
import openai
import pytest

import llama2_jax
from llama2_jax.model import checkpoint
from llama2_jax.model.config import TINY
from llama2_jax.inference.params import SamplingParams
from tests.conftest import GOLDEN, TOKENIZER, penalized_greedy, save_random, serving

CFG = TINY.replace(vocab_size=32000, max_seq_len=512)
CONTEXT = 256
MODEL = "tiny-chat"
SYSTEM = {"role": "system", "content": "You are a terse assistant."}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, one_device_mesh):
    return save_random(tmp_path_factory, one_device_mesh, MODEL, CFG, seed=5)


@pytest.fixture(scope="module")
def server(tiny_dir):
    with serving(tiny_dir, MODEL, max_slots=4, context_length=CONTEXT, prefill_chunk=32,
                 prefix_cache_mb=8) as s:
        yield s


@pytest.fixture(scope="module")
def ref(tiny_dir, one_device_mesh):
    return checkpoint.load(tiny_dir, mesh=one_device_mesh)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


def greedy(ref, ids, n):
    return llama2_jax.generate(ref, [ids], max_new_tokens=n, temperature=0)[0]


def chat_ids(tokenizer, messages):
    return llama2_jax.encode_dialog(tokenizer, messages)


# -- the chat format, through the server --------------------------------------------------------
def test_chat_prompts_are_metas_golden_ids(server):
    cases = [json.loads(line) for line in open(GOLDEN)]
    reasons = {"special_tags": "reserved tag", "roles": "roles must be",
               "last_not_user": "the last message must be the user's"}
    for case in cases:
        status, body = server.post("/v1/chat/completions", {
            "model": MODEL, "messages": case["dialog"], "max_tokens": 1, "temperature": 0,
            "return_token_ids": True})
        if "error" in case:
            assert status == 400, (case, body)
            assert reasons[case["error"]] in body["error"]["message"]
            assert body["error"]["param"] == "messages"
        else:
            assert status == 200, body
            assert body["prompt_token_ids"] == [case["tokens"]]  # one BOS per turn, exactly
            assert body["usage"]["prompt_tokens"] == len(case["tokens"])


# -- the openai client -----------------------------------------------------------------------
def test_openai_chat_equals_generate_with_forward_logprobs(client, ref, tokenizer):
    messages = [SYSTEM, {"role": "user", "content": "Name three llamas. 🦙"}]
    ids = chat_ids(tokenizer, messages)
    answer = greedy(ref, ids, 24)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24,
                                       temperature=0, logprobs=True, top_logprobs=5)
    choice = r.choices[0]
    assert choice.message.content == tokenizer.decode(answer)
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 24)
    assert r.usage.total_tokens == len(ids) + 24
    logits = llama2_jax.forward(ref, ids + answer[:-1])[len(ids) - 1:]  # [24, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    got = choice.logprobs.content
    assert len(got) == 24
    for i, t in enumerate(answer):
        assert got[i].logprob == pytest.approx(float(logp[i, t]), abs=2e-4)
        top = np.argsort(-np.asarray(logp[i]))[:5]
        assert [a.logprob for a in got[i].top_logprobs] == pytest.approx(
            [float(logp[i, j]) for j in top], abs=2e-4)
        assert bytes(got[i].bytes).decode("utf-8", "replace") == got[i].token
    assert "".join(t.token for t in got) == choice.message.content  # as OpenAI's join


def test_openai_stream_is_the_same_answer_in_pieces(client, ref, tokenizer):
    messages = [{"role": "user", "content": "Hi 🦙 über Ünïcode"}]
    ids = chat_ids(tokenizer, messages)
    answer = tokenizer.decode(greedy(ref, ids, 30))
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=30, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == answer and len([p for p in pieces if p]) > 1
    assert all("\ufffd" not in p for p in pieces)  # never half a character
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "length" and set(finish[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_take_text_or_ids_without_a_template(client, ref, tokenizer):
    text = "The llama is"
    ids = tokenizer.encode(text, bos=True)
    answer = tokenizer.decode(greedy(ref, ids, 12))
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=12, temperature=0)
    assert r.choices[0].text == answer and r.usage.prompt_tokens == len(ids)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == answer
    other = tokenizer.encode("A camel", bos=True)
    r = client.completions.create(model=MODEL, prompt=[ids, other], max_tokens=6, n=2,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [tokenizer.decode(greedy(ref, ids, 6))] * 2 + \
        [tokenizer.decode(greedy(ref, other, 6))] * 2
    assert r.usage.prompt_tokens == len(ids) + len(other)  # each prompt once, not per choice
    stream = client.completions.create(model=MODEL, prompt=text, max_tokens=12, temperature=0,
                                       stream=True, logprobs=2)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == answer
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks) == 12


def test_echo_scores_prompts_as_lm_eval_asks(server, ref, tokenizer):
    """lm-eval's loglikelihood request: token-id prompts (one over several prefill chunks),
    echo, logprobs, max_tokens 0 or 1: every prompt token's log-probability is the forward
    pass's (the first is null), whatever the prefix cache holds."""
    long = tokenizer.encode("The llama is a domesticated South American camelid, widely "
                            "used as a meat and pack animal by Andean cultures since the "
                            "pre-Columbian era. Llamas are social animals and live with "
                            "others as a herd. Their wool is soft.", bos=True)
    short = tokenizer.encode("A camel", bos=True)
    assert len(long) > 32  # over the server's prefill chunk
    server.post("/v1/completions", {"model": MODEL, "prompt": long, "max_tokens": 2})  # cached
    for max_tokens in (0, 1):
        status, r = server.post("/v1/completions", {
            "model": MODEL, "prompt": [long, short], "echo": True, "logprobs": 3,
            "max_tokens": max_tokens, "temperature": 0})
        assert status == 200, (r, server.output()[-3000:])
        for choice, ids in zip(r["choices"], (long, short)):
            lp = choice["logprobs"]
            assert len(lp["token_logprobs"]) == len(ids) + max_tokens
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            want = np.asarray(jax.nn.log_softmax(llama2_jax.forward(ref, ids), axis=-1))
            np.testing.assert_allclose(lp["token_logprobs"][1:len(ids)],
                                       want[np.arange(len(ids) - 1), ids[1:]], atol=1e-5, rtol=0)
            for t, alts in enumerate(lp["top_logprobs"][1:len(ids)]):
                assert len(alts) == 3
                assert max(alts.values()) == pytest.approx(want[t].max(), abs=1e-5)
            answer = greedy(ref, ids, 1)[:max_tokens]
            assert choice["text"].startswith(tokenizer.decode(ids))
            assert "".join(lp["tokens"]) == choice["text"]
            assert [choice["text"][o:] for o in lp["text_offset"]][-1] == lp["tokens"][-1]
            if answer:
                assert lp["token_logprobs"][-1] == pytest.approx(
                    float(want[-1, answer[0]]), abs=2e-4)
            assert choice["finish_reason"] == "length"
        assert r["usage"]["completion_tokens"] == 2 * max_tokens


def test_echo_of_text_prompts_streamed_and_not(client, ref, tokenizer):
    text = "The llama is"
    ids = tokenizer.encode(text, bos=True)
    answer = greedy(ref, ids, 6)
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=6, temperature=0,
                                  echo=True)
    whole = tokenizer.decode(ids + answer)
    assert r.choices[0].text == whole and r.choices[0].logprobs is None
    chunks = list(client.completions.create(model=MODEL, prompt=text, max_tokens=6,
                                            temperature=0, echo=True, logprobs=1, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole
    tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    lps = [x for c in chunks for x in c.choices[0].logprobs.token_logprobs]
    assert "".join(tokens) == whole and len(lps) == len(ids) + 6 and lps[0] is None


def test_penalties_and_biases_through_the_server_equal_hf_processors(client, ref, tokenizer):
    """OpenAI's penalties and logit_bias, and vLLM's repetition_penalty / min_tokens, each
    request's answer that of HF's processors on the forward pass's logits, while plain
    requests in the same batch keep their plain answers."""
    messages = [{"role": "user", "content": "Count the llamas, then count them again."}]
    ids = chat_ids(tokenizer, messages)
    forward = lambda seq: llama2_jax.forward(ref, seq)
    plain = greedy(ref, ids, 16)
    eos = tokenizer.eos_id
    cases = [
        ({"frequency_penalty": 1.5, "presence_penalty": 0.5},
         SamplingParams(frequency_penalty=1.5, presence_penalty=0.5)),
        ({"logit_bias": {str(plain[0]): -100, "29871": 7.5}},
         SamplingParams(logit_bias=((plain[0], -100.0), (29871, 7.5)))),
        ({"extra_body": {"repetition_penalty": 1.8, "min_tokens": 12},
          "logit_bias": {str(eos): 100}},
         SamplingParams(repetition_penalty=1.8, min_tokens=12, logit_bias=((eos, 100.0),))),
        ({}, SamplingParams()),
    ]

    def ask(kwargs):
        extra = {"return_token_ids": True, **kwargs.pop("extra_body", {})}
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                           temperature=0, extra_body=extra, **kwargs)
        return r.choices[0]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, [dict(k) for k, _ in cases]))
    for choice, (_, s) in zip(got, cases):
        want = [t for t in penalized_greedy(forward, ids, 16, s, eos)]
        if eos in want:  # the answer stops there
            want = want[:want.index(eos)]
        assert choice.token_ids == want, s
    assert got[-1].token_ids == plain[:len(got[-1].token_ids)]
    # EOS, forced by its bias, held back by min_tokens until then
    assert got[2].finish_reason == "stop" and len(got[2].token_ids) == 12


def test_echo_shows_the_stop_token_that_ended_the_answer(server, tokenizer):
    """lm-eval reads token_logprobs[ctxlen:-1]: the stop token must be there when the
    answer is EOS (its logprob the model's)."""
    ids = tokenizer.encode("The llama is", bos=True)
    status, r = server.post("/v1/completions", {
        "model": MODEL, "prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1,
        "temperature": 0, "logit_bias": {str(tokenizer.eos_id): 100}})
    assert status == 200, r
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert len(choice["logprobs"]["token_logprobs"]) == len(ids) + 1
    assert choice["logprobs"]["token_logprobs"][-1] < 0  # the model's, not the biased one


def test_stop_strings_end_the_answer_before_them(client, ref, tokenizer):
    messages = [{"role": "user", "content": "Tell me a story."}]
    full = tokenizer.decode(greedy(ref, chat_ids(tokenizer, messages), 40))
    stop = full[len(full) // 2:len(full) // 2 + 3]
    expected = full[:full.index(stop)]
    for stream in (False, True):
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40,
                                           temperature=0, stop=[stop, "\x00never"],
                                           stream=stream)
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert (text, reason) == (expected, "stop")


def test_seeds_reproduce_and_n_choices_differ(client):
    def ask(seed, n=1):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                   "content": "Hello"}],
                                           max_tokens=16, temperature=1.0, top_p=0.95,
                                           seed=seed, n=n)
        return [c.message.content for c in r.choices]
    assert ask(7) == ask(7) != ask(8)
    two = ask(7, n=2)
    assert two[0] == ask(7)[0] and two[1] != two[0]  # choice j draws with seed + j
    assert two[1] == ask(8)[0]


def test_a_model_by_its_id(server, client):
    assert client.models.retrieve(MODEL).id == MODEL
    status, reply = server.get("/v1/models/gpt-4")
    assert status == 404 and reply["error"]["code"] == "model_not_found"


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert server.get("/health") == (200, {"status": "ok"})


# -- concurrency -----------------------------------------------------------------------------
def test_sixteen_concurrent_requests_each_equal_generate_alone(server, ref):
    rng = np.random.RandomState(3)
    prompts = [rng.randint(3, CFG.vocab_size, n).tolist() for n in rng.randint(2, 200, 16)]
    temps = [0.0 if i % 2 == 0 else 0.9 for i in range(16)]

    def ask(i):
        status, body = server.post("/v1/completions", {
            "model": MODEL, "prompt": prompts[i], "max_tokens": 20, "temperature": temps[i],
            "seed": 100 + i, "return_token_ids": True})
        assert status == 200, body
        return body["choices"][0]["token_ids"]

    compiles = server.metric("llama2_jax_compiles")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))  # 4 slots: requests join as others leave
    for i in range(16):
        if temps[i] == 0:
            assert together[i] == greedy(ref, prompts[i], 20), i
        else:  # a sampled request alone draws what it drew beside the others
            alone = ask(i)
            if together[i] != alone:
                # A decode step's matmuls over 1 or 4 rows round differently in the last
                # bits; the draw (an inverse CDF in vocabulary order, every token possible
                # at temperature 0.9) can then fall on the neighbouring token id, and the
                # rows go their own ways from there. Anything else is a real difference.
                d = next(j for j, (a, b) in enumerate(zip(together[i], alone)) if a != b)
                assert abs(together[i][d] - alone[d]) == 1, (i, d, together[i], alone)
    assert server.metric("llama2_jax_compiles") == compiles  # warm-up compiled every shape
    assert server.metric("llama2_jax_compiles_after_ready") == 0


def test_long_prompt_is_prefilled_in_chunks_while_a_stream_runs(server, ref, client):
    arrivals, started = [], threading.Event()

    def stream_a():
        for _ in client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=200,
                                               temperature=0, stream=True):
            arrivals.append(time.monotonic())
            if len(arrivals) == 3:
                started.set()

    a = threading.Thread(target=stream_a)
    a.start()
    assert started.wait(60)
    long = np.random.RandomState(4).randint(3, CFG.vocab_size, 220).tolist()  # 7 chunks of 32
    sent = time.monotonic()
    first = []
    for chunk in client.completions.create(model=MODEL, prompt=long, max_tokens=8,
                                           temperature=0, stream=True):
        first.append(time.monotonic())
        text = chunk  # noqa: F841
    a.join(120)
    between = [t for t in arrivals if sent < t < first[0]]
    assert len(between) >= 3  # stream A kept decoding between the prompt's chunks
    r = client.completions.create(model=MODEL, prompt=long, max_tokens=8, temperature=0)
    assert r.choices[0].text == llama2_jax.Tokenizer(TOKENIZER).decode(greedy(ref, long, 8))


def test_prefix_cache_hits_give_the_tokens_of_misses(server, client, ref, tokenizer):
    system = {"role": "system", "content": "You answer questions about llamas, alpacas and "
              "vicuñas in great detail, citing the Andes whenever possible. " * 3}
    turn1 = [system, {"role": "user", "content": "What do llamas eat?"}]
    hits = server.metric("llama2_jax_prefix_cache_hits_total")
    r1 = client.chat.completions.create(model=MODEL, messages=turn1, max_tokens=12,
                                        temperature=0)
    other = [system, {"role": "user", "content": "Where do alpacas live?"}]
    r2 = client.chat.completions.create(model=MODEL, messages=other, max_tokens=12,
                                        temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "And vicuñas?"}]
    r3 = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=12,
                                        temperature=0)
    for r, messages in ((r2, other), (r3, turn2)):
        ids = chat_ids(tokenizer, messages)
        assert r.choices[0].message.content == tokenizer.decode(greedy(ref, ids, 12))
        assert r.usage.prompt_tokens_details.cached_tokens >= 64  # the system prompt at least
    # The resent conversation reuses all of turn 1's prompt (its answer, re-tokenized from
    # text, matches the generated ids only as far as a random model's pieces are canonical).
    assert r3.usage.prompt_tokens_details.cached_tokens >= len(chat_ids(tokenizer, turn1))
    ids = chat_ids(tokenizer, turn1)
    first = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0,
                                      extra_body={"return_token_ids": True})
    answer = first.choices[0].model_extra["token_ids"]
    more = ids + answer + tokenizer.encode("Go on.", bos=True)
    r4 = client.completions.create(model=MODEL, prompt=more, max_tokens=12, temperature=0)
    assert r4.usage.prompt_tokens_details.cached_tokens >= len(ids) + len(answer) - 1
    assert r4.choices[0].text == tokenizer.decode(greedy(ref, more, 12))
    assert server.metric("llama2_jax_prefix_cache_hits_total") >= hits + 2
    assert 0 < server.metric("llama2_jax_prefix_cache_hit_rate") <= 1


def test_disconnect_mid_stream_frees_the_slot(server):
    finished = "llama2_jax_generations_finished_total"
    cancelled = server.metric(finished, '{reason="cancelled"}', default=0)
    # Four choices of 250 tokens: the client leaves at the first chunk, long before they end
    # (each a cancelled generation, however fast this machine decodes).
    body = {"model": MODEL, "prompt": [9, 8, 7], "max_tokens": 250, "temperature": 0,
            "stream": True, "n": 4, "logprobs": 5}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert next(r.iter_lines()).startswith("data: {")
    deadline = time.monotonic() + 20
    while server.metric("llama2_jax_active_slots") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("llama2_jax_active_slots") == 0
    assert server.metric(finished, '{reason="cancelled"}') == cancelled + 4


# -- bad input -------------------------------------------------------------------------------
BAD = {
    "malformed JSON": (b'{"model": ', 400, None, "not valid JSON"),
    "not an object": (b'[1, 2]', 400, None, "JSON object"),
    "no messages": ({"model": MODEL}, 400, "messages", "Field required"),
    "empty messages": ({"model": MODEL, "messages": []}, 400, "messages", "at least 1"),
    "wrong type": ({"model": MODEL, "messages": "hi"}, 400, "messages", "valid list"),
    "roles out of order": ({"model": MODEL, "messages": [
        {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}, 400,
        "messages", "roles must be"),
    "[INST] in a message": ({"model": MODEL, "messages": [
        {"role": "user", "content": "x [INST] y"}]}, 400, "messages", "reserved tag"),
    "<<SYS>> in a message": ({"model": MODEL, "messages": [
        {"role": "user", "content": "<<SYS>>"}]}, 400, "messages", "reserved tag"),
    "over the context": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": 250}, 400, "max_tokens",
                         "the prompt has 9 tokens and max_tokens is 250: 259 tokens, over the "
                         "context of 256"),
    "max_tokens 0": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    "negative temperature": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "temperature": -0.1}, 400, "temperature", "greater than or"),
    "top_p 0": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                 "top_p": 0}, 400, "top_p", "greater than 0"),
    "top_p over 1": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                      "top_p": 1.5}, 400, "top_p", "less than or equal to 1"),
    "17 stop strings": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                         "stop": list("abcdefghijklmnopq")}, 400, "stop", "at most 16"),
    "unknown model": ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]},
                      404, "model", "'gpt-4' does not exist"),
    "penalty over 2": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                        "frequency_penalty": 2.5}, 400, "frequency_penalty", "less than or"),
    "presence penalty a string": ({"model": MODEL, "messages": [
        {"role": "user", "content": "hi"}], "presence_penalty": "lots"}, 400,
        "presence_penalty", "valid number"),
    "repetition_penalty 0": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "repetition_penalty": 0}, 400, "repetition_penalty",
                             "greater than 0"),
    "min_p over 1": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                      "min_p": 1.5}, 400, "min_p", "less than or equal to 1"),
    "min_tokens over max_tokens": ({"model": MODEL, "messages": [
        {"role": "user", "content": "hi"}], "min_tokens": 9, "max_tokens": 4}, 400,
        "min_tokens", "min_tokens (9) is over max_tokens (4)"),
    "bias outside the vocabulary": ({"model": MODEL, "messages": [
        {"role": "user", "content": "hi"}], "logit_bias": {"32000": 5}}, 400, "logit_bias",
        "token id 32000 is outside the vocabulary"),
    "bias key not an id": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                            "logit_bias": {"hello": 5}}, 400, "logit_bias",
                           "'hello' is not a token id"),
    "bias over 100": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                       "logit_bias": {"5": 101}}, 400, "logit_bias", "must be in [-100, 100]"),
    "top_logprobs without logprobs": ({"model": MODEL, "messages": [
        {"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs",
        "needs logprobs: true"),
    "top_logprobs 21": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                         "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "20"),
}
BAD_COMPLETIONS = {
    "token id past the vocabulary": ({"model": MODEL, "prompt": [1, 32000]}, 400, "prompt",
                                     "token id 32000 is outside the vocabulary 0..31999"),
    "empty prompt": ({"model": MODEL, "prompt": []}, 400, "prompt", "empty"),
    "max_tokens 0 without echo": ({"model": MODEL, "prompt": "a", "max_tokens": 0}, 400,
                                  "max_tokens", "needs echo"),
    "logprobs 21": ({"model": MODEL, "prompt": "a", "logprobs": 21, "echo": True}, 400,
                    "logprobs", "20"),
    "long prompt, no max_tokens": ({"model": MODEL, "prompt": [5] * 300, "max_tokens": None},
                                   400, "prompt", "300 tokens, which leaves no room"),
}


@pytest.mark.parametrize("path,case", [("/v1/chat/completions", k) for k in BAD] +
                         [("/v1/completions", k) for k in BAD_COMPLETIONS])
def test_bad_input_gets_an_openai_error(server, path, case):
    body, status, param, message = (BAD if path.endswith("chat/completions")
                                    else BAD_COMPLETIONS)[case]
    got, reply = server.post(path, body)
    assert got == status, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and message in error["message"], error


def test_bad_requests_do_not_disturb_a_running_one(server, ref, client, tokenizer):
    body = {"model": MODEL, "prompt": [3, 4, 5], "max_tokens": 60, "temperature": 0,
            "return_token_ids": True}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        good = pool.submit(server.post, "/v1/completions", body)
        bad = [pool.submit(server.post, "/v1/completions", b"{" * i) for i in range(1, 30)]
        big = pool.submit(server.post, "/v1/completions", b" " * (2 << 20))
        assert all(f.result()[0] == 400 for f in bad)
        assert big.result()[0] == 413 and "over the limit" in big.result()[1]["error"]["message"]
        status, reply = good.result()
    assert status == 200 and reply["choices"][0]["token_ids"] == greedy(ref, [3, 4, 5], 60)
    status, reply = server.get("/v2/nothing")
    assert status == 404 and "error" in reply


# -- a soak ----------------------------------------------------------------------------------
def test_soak_leaks_no_slot_queue_entry_cache_bytes_or_memory(server):
    rng = random.Random(0)

    def one(i):
        n = rng.randint(1, 180)
        body = {"model": MODEL, "prompt": [rng.randint(3, 31999) for _ in range(n)],
                "max_tokens": rng.randint(1, 40), "temperature": rng.choice([0, 0.8]),
                "stream": rng.random() < 0.6}
        if body["stream"] and rng.random() < 0.4:  # leave early
            with httpx.stream("POST", server.url + "/v1/completions", json=body,
                              timeout=60) as r:
                for k, _ in enumerate(r.iter_lines()):
                    if k >= rng.randint(0, 6):
                        break
            return "left"
        status, _ = server.post("/v1/completions", body)
        return status

    def rounds(count):
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            return list(pool.map(one, range(count), timeout=300))

    rounds(60)  # warm: allocations that are made once
    rss0 = server.rss_bytes()
    results = rounds(150)
    assert set(results) <= {200, "left"} and results.count("left") > 10
    deadline = time.monotonic() + 20
    while server.metric("llama2_jax_active_slots") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("llama2_jax_active_slots") == 0
    assert server.metric("llama2_jax_queue_depth") == 0
    assert server.metric("llama2_jax_prefix_cache_bytes") <= 8 << 20
    assert server.metric("llama2_jax_compiles_after_ready") == 0
    growth = server.rss_bytes() - rss0
    assert growth < 48 << 20, f"resident memory grew by {growth / 2**20:.1f} MiB"
