"""One engine behind every door: for one dialog, settings and seed, `generate`, a `Session`
turn, the chat app's one-shot answer, `/v1/completions` with token ids and
`/v1/chat/completions` give the same tokens, greedy and sampled; on one device in float32 and
on eight devices with int8 weights (each door against the others on the same mesh and format).
"""

import io

import jax
import numpy as np
import pytest

import llama2_jax
from benchmarks.serving import ServerProcess
from llama2_jax import chat as chat_app
from llama2_jax.inference.generate import Engine, Session
from llama2_jax.inference.params import SamplingParams
from llama2_jax.model import checkpoint, sharding
from llama2_jax.model.config import TINY
from tests.conftest import TOKENIZER, load_config_file

CFG = TINY.replace(vocab_size=32000, max_seq_len=512)
CONTEXT = 256
NEW = 20
SYSTEM = "You are a terse assistant."
QUESTION = "Name three llamas."
SETTINGS = {"greedy": SamplingParams(0.0, 1.0, 0, seed=3),
            "sampled": SamplingParams(0.8, 0.9, 0, seed=7),
            "top-k": SamplingParams(1.0, 1.0, 40, seed=11)}
SETUPS = {"1 device, float32": (1, "none"), "8 devices, int8": (8, "int8")}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, one_device_mesh):
    path = tmp_path_factory.mktemp("doors") / "tiny-chat"
    checkpoint.save(path, checkpoint.random_model(CFG, one_device_mesh, seed=21),
                    tokenizer_path=TOKENIZER)
    return str(path)


@pytest.fixture(scope="module", params=list(SETUPS))
def setup(request, tiny_dir):
    """(the model on that mesh in that format, the chat app, a server of it)."""
    devices, quantization = SETUPS[request.param]
    mesh = sharding.make_mesh(1, devices, 1, devices=jax.devices()[:devices])
    model = checkpoint.load(tiny_dir, mesh=mesh, quantization=quantization)
    server = ServerProcess(devices=devices, checkpoint_dir=tiny_dir, train_config="",
                           model_name="tiny-chat", max_slots=4, context_length=CONTEXT,
                           prefill_chunk=32, quantization=quantization, fsdp=-1, tensor=1,
                           warmup=False)
    try:
        chat = build_chat(tiny_dir, devices, quantization)
        yield model, chat, server.wait_ready()
    finally:
        assert server.terminate() == 0, server.output()


def dialog():
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]


def build_chat(tiny_dir, devices, quantization):
    """The chat app as `python -m llama2_jax.chat --config.prompt=...` builds it."""
    config = load_config_file(
        "llama2_7b_chat", checkpoint_dir=tiny_dir, context_length=CONTEXT, fsdp=devices,
        tensor=1, quantization=quantization, max_new_tokens=NEW, system_prompt=SYSTEM,
        prompt=QUESTION, compilation_cache_dir="")
    config.data = 1
    return chat_app.build(config, io.StringIO())


def one_shot(chat, params: SamplingParams) -> str:
    """The app's one-shot answer with `params` (what --config.temperature=... would set)."""
    chat.params, chat.turns = params, 0
    chat.reset()
    out = io.StringIO()
    assert chat_app.run_once(chat, QUESTION, out, io.StringIO()) == 0
    return out.getvalue()[:-1]  # the app ends the answer with a newline


@pytest.mark.parametrize("name", list(SETTINGS))
def test_every_door_gives_the_same_tokens(setup, tokenizer, name):
    model, chat, server = setup
    params = SETTINGS[name]
    ids = llama2_jax.encode_dialog(tokenizer, dialog())
    [want] = llama2_jax.generate(model, [ids], max_new_tokens=NEW,
                                 temperature=params.temperature, top_p=params.top_p,
                                 top_k=params.top_k, seed=params.seed)
    assert len(want) == NEW  # a random model rarely says EOS; the comparison is then full
    if name != "greedy":  # sampling is in play: not the greedy answer
        assert want != llama2_jax.generate(model, [ids], max_new_tokens=NEW, temperature=0)[0]

    session = Session(Engine(model), length=CONTEXT)
    turn = session.generate(ids, max_new_tokens=NEW, params=params, stop_ids=(2,))
    assert list(turn) == want

    assert one_shot(chat, params) == tokenizer.decode(want)

    body = {"model": "tiny-chat", "max_tokens": NEW, "temperature": params.temperature,
            "top_p": params.top_p, "seed": params.seed, "return_token_ids": True}
    if params.top_k:
        body["top_k"] = params.top_k
    status, chat = server.post("/v1/chat/completions", {**body, "messages": dialog()})
    assert status == 200, chat
    assert chat["choices"][0]["token_ids"] == want
    status, completion = server.post("/v1/completions", {**body, "prompt": ids})
    assert status == 200, completion
    assert completion["choices"][0]["token_ids"] == want


def test_a_rows_tokens_do_not_depend_on_its_batch_or_slot(tiny_dir, one_device_mesh):
    """Sampled rows in a batch larger than the slots (it queues, so rows land in whichever
    slot frees first): each row's tokens are those it gets alone."""
    model = checkpoint.load(tiny_dir, mesh=one_device_mesh)
    rs = np.random.RandomState(5)
    prompts = [rs.randint(3, CFG.vocab_size, n).tolist() for n in (5, 40, 17, 9, 26)]
    batched = Engine(model, max_batch=2).generate(
        prompts, max_new_tokens=8, params=SamplingParams(0.8, 0.9, 0, seed=100))
    alone = Engine(model, max_batch=1)
    assert batched == [alone.generate([p], max_new_tokens=8,
                                      params=SamplingParams(0.8, 0.9, 0, seed=100 + b))[0]
                       for b, p in enumerate(prompts)]
