"""LoRA adapters served per request over real sockets: a request's `model` names an adapter,
rows of different adapters and the base share the steps, each answer equal to its merged
model's greedy tokens (a cache-free forward pass); vLLM's load / unload routes behind the API
key, with no compile after warm-up; bad inputs answered with errors that name them."""

import concurrent.futures

import numpy as np
import openai
import pytest

import llama2_jax
from llama2_jax.model import adapter, checkpoint
from llama2_jax.model.config import TINY
from tests.conftest import random_adapter, save_random, serving

CFG = TINY.replace(vocab_size=32000, max_seq_len=512)
MODEL = "tiny-base"
KEY = "sk-test-adapters"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = [1] + list(range(300, 320))  # 21 tokens: long enough to be a cached prefix
N = 10
ADAPTERS = {"sql": (None, 4, 1), "qv": (("wq", "wv"), 2, 2), "mlp": (("w1", "w2", "w3"), 8, 3),
            "big": (("wq",), 16, 4)}  # big: over the server's max_lora_rank


@pytest.fixture(scope="module")
def made(tmp_path_factory, one_device_mesh):
    """(base checkpoint, {name: adapter directory})."""
    base = save_random(tmp_path_factory, one_device_mesh, MODEL, CFG, seed=11)
    root = tmp_path_factory.mktemp("served_adapters")
    dirs = {}
    for name, (targets, rank, seed) in ADAPTERS.items():
        dirs[name] = str(root / name)
        adapter.save(dirs[name], random_adapter(CFG, targets, rank=rank, alpha=2.0 * rank,
                                                seed=seed, base_dir=str(base)))
    return base, dirs


@pytest.fixture(scope="module")
def references(made, one_device_mesh):
    """name ("" for the base) -> the greedy tokens after PROMPT of the merged model."""
    base_dir, dirs = made
    base = checkpoint.load(base_dir, mesh=one_device_mesh)

    def greedy(model):
        seq = list(PROMPT)
        for _ in range(N):
            seq.append(int(np.argmax(llama2_jax.forward(model, seq)[-1])))
        return seq[len(PROMPT):]

    out = {"": greedy(base)}
    for name in ("sql", "qv", "mlp"):
        out[name] = greedy(adapter.merge(base, adapter.load(dirs[name], mesh=one_device_mesh)))
    assert len({tuple(v) for v in out.values()}) == 4  # each adapter changes the answer
    return out


@pytest.fixture(scope="module")
def server(made):
    base, dirs = made
    listed = ",".join(f"{n}={dirs[n]}" for n in ("sql", "qv"))
    with serving(base, MODEL, max_slots=4, context_length=128, prefill_chunk=32, api_key=KEY,
                 adapters=listed, max_loras=3, max_lora_rank=8) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(client, model):
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    assert r.model == model
    return r.choices[0].token_ids


def test_adapters_and_base_in_one_batch(server, client, references):
    assert ask(client, MODEL) == references[""]  # first alone: its prompt becomes a prefix
    names = [MODEL, "sql", "qv", "sql", MODEL, "qv"]
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        got = list(pool.map(lambda m: ask(client, m), names))
    for name, tokens in zip(names, got):
        assert tokens == references["" if name == MODEL else name], name
    ids = [(m.id, getattr(m, "parent", None)) for m in client.models.list().data]
    assert ids == [(MODEL, None), ("sql", MODEL), ("qv", MODEL)]
    assert client.models.retrieve("qv").parent == MODEL
    assert server.metric("llama2_jax_lora_adapters") == 2
    assert server.metric("llama2_jax_lora_adapter_capacity") == 3


def test_load_use_and_unload_at_run_time(server, client, made, references):
    _, dirs = made
    status, body = server.post("/v1/load_lora_adapter", {"lora_name": "mlp",
                                                         "lora_path": dirs["mlp"]}, headers=AUTH)
    assert status == 200, body
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda m: ask(client, m), ["mlp", MODEL, "sql"]))
    assert got == [references["mlp"], references[""], references["sql"]]
    assert server.metric("llama2_jax_compiles_after_ready") == 0
    # all three places taken: a fourth is refused, naming the limit
    status, body = server.post("/v1/load_lora_adapter", {"lora_name": "more",
                                                         "lora_path": dirs["qv"]}, headers=AUTH)
    assert status == 400 and "all 3 adapter slots (max_loras)" in body["error"]["message"]
    status, body = server.post("/v1/unload_lora_adapter", {"lora_name": "mlp"}, headers=AUTH)
    assert status == 200, body
    with pytest.raises(openai.NotFoundError, match="'mlp' does not exist"):
        ask(client, "mlp")
    assert "mlp" not in [m.id for m in client.models.list().data]
    # its place is free again: the same directory under another name
    status, body = server.post("/v1/load_lora_adapter", {"lora_name": "mlp2",
                                                         "lora_path": dirs["mlp"]}, headers=AUTH)
    assert status == 200, body
    assert ask(client, "mlp2") == references["mlp"]
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "mlp2"}, headers=AUTH)[0] == 200


@pytest.mark.parametrize("body, status, param, message", [
    ({"lora_name": "x", "lora_path": "/nonexistent/adapter"}, 400, "lora_path",
     "adapter directory not found: /nonexistent/adapter"),
    ({"lora_name": "sql", "lora_path": "BIG"}, 400, "lora_name",
     "an adapter named 'sql' is already loaded"),
    ({"lora_name": "x", "lora_path": "BIG"}, 400, "lora_path",
     "rank 16 is over the server's max_lora_rank 8"),
    ({"lora_name": MODEL, "lora_path": "BIG"}, 400, "lora_name", "the base model's name"),
    ({"lora_name": "x"}, 400, "lora_path", "Field required"),
    ({"lora_name": "", "lora_path": "BIG"}, 400, "lora_name", "at least 1 character"),
])
def test_bad_loads_are_named(server, client, made, references, body, status, param, message):
    body = {k: made[1]["big"] if v == "BIG" else v for k, v in body.items()}
    got, answer = server.post("/v1/load_lora_adapter", body, headers=AUTH)
    assert (got, answer["error"]["param"]) == (status, param), answer
    assert message in answer["error"]["message"]
    assert ask(client, "qv") == references["qv"]  # nothing disturbed


def test_adapter_routes_need_the_key_and_names_must_exist(server, client, made):
    status, body = server.post("/v1/load_lora_adapter", {"lora_name": "y",
                                                         "lora_path": made[1]["qv"]})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = server.post("/v1/unload_lora_adapter", {"lora_name": "nope"}, headers=AUTH)
    assert status == 404 and body["error"]["param"] == "lora_name"
    with pytest.raises(openai.NotFoundError, match="this server serves 'tiny-base', 'sql', 'qv'"):
        ask(client, "nope")
