"""8-bit KV caches (int8, FP8 e4m3; a float32 scale per position and KV head): attention over
them equals attention over the same keys/values quantized independently in NumPy; every
layout and step (stacked and per-layer, chunks and decode, commit, prefix extract / insert)
carries the codes and scales; the planner counts what the slots allocate."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from llama2_jax import footprint
from llama2_jax.inference.generate import Engine
from llama2_jax.inference.params import GREEDY
from llama2_jax.inference.slots import Slots
from llama2_jax.model import checkpoint, kv_cache
from llama2_jax.model.config import TINY
from llama2_jax.model.kv_cache import QKV
from tests.test_batching import CFG, PROMPTS

METHODS = ("int8", "fp8")


def numpy_8bit(x: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax over the last axis (a head's H values), written out in NumPy: codes
    (as float32) and scales."""
    amax = np.abs(x).max(-1)
    if method == "int8":
        s = np.where(amax > 0, amax / 127, 1).astype(np.float32)
        q = np.clip(np.round(x / s[..., None]), -127, 127)
    else:
        s = np.where(amax > 0, amax / 448, 1).astype(np.float32)
        q = (x / s[..., None]).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return q.astype(np.float32), s


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "per-layer"])
def test_attention_over_8bit_blocks_equals_numpy_dequantized_keys_and_values(method, stacked):
    rng = np.random.default_rng(0)
    L, K, G, H, layer = 2, 2, 2, 8, 1
    groups, blocks = (1, 3), (8, 8)  # a one-row group (its own decode path) and three rows
    n_layers = L if stacked else None
    quantized = kv_cache.init_blocks(n_layers, groups, blocks, K, H, jnp.float32, method)
    plain = kv_cache.init_blocks(n_layers, groups, blocks, K, H, jnp.float32)
    assert isinstance(quantized.groups[1][0].k, QKV) and quantized.length == 16
    starts = np.array([0, 3, 6, 9])
    for T in (5, 1, 1):  # a chunk, then two decode steps
        positions = jnp.asarray(starts[:, None] + np.arange(T))
        k = rng.standard_normal((4, T, K, H)).astype(np.float32) * np.float32(3.0)
        v = rng.standard_normal((4, T, K, H)).astype(np.float32)
        q = jnp.asarray(rng.standard_normal((4, T, K, G, H)), jnp.float32)
        (kq, ks), (vq, vs) = numpy_8bit(k, method), numpy_8bit(v, method)
        quantized = kv_cache.write(quantized, jnp.asarray(k), jnp.asarray(v), layer, positions)
        plain = kv_cache.write(plain, jnp.asarray(kq * ks[..., None]),
                               jnp.asarray(vq * vs[..., None]), layer, positions)
        got = kv_cache.attention(q, quantized, layer, positions)
        want = kv_cache.attention(q, plain, layer, positions)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
        starts = starts + T
    # the codes the cache holds are NumPy's (at most a rounding of a division apart)
    blk = quantized.groups[1][0].k  # rows 1..3, positions 0..7
    codes = np.asarray(blk.q[layer] if stacked else blk.q).astype(np.float32)
    dequantized = codes * np.asarray(blk.s[layer] if stacked else blk.s)[..., None]
    ref = plain.groups[1][0].k
    np.testing.assert_allclose(dequantized, np.asarray(ref[layer] if stacked else ref),
                               rtol=0.07 if method == "fp8" else 0, atol=0.03)
    with pytest.raises(ValueError, match="kv_quantization must be one of none, int8, fp8"):
        kv_cache.init_blocks(None, (1,), (8,), K, H, jnp.float32, "int4")


@pytest.fixture(scope="module")
def model(one_device_mesh):
    return checkpoint.random_model(CFG, one_device_mesh, seed=7)


def greedy(slots, slot, prompt, n, chunk):
    for start in range(0, len(prompt), chunk):
        out = slots.prefill(slot, prompt[start:start + chunk], start,
                            start + chunk >= len(prompt), GREEDY)
    got = [int(out.tokens[0])]  # a prefill returns its one row's token
    return got + [int(slots.decode().tokens[slot]) for _ in range(n - 1)]


@pytest.mark.parametrize("method", ["int8"])  # fp8's codes: the test above
def test_slots_with_8bit_caches(model, method):
    """Scanned and per-layer steps agree; chunked prompt scores stay close to the
    full-precision cache's; a prefix extracted and inserted gives the tokens of the prompt
    prefilled whole; the planner's KV bytes are what the slots allocate."""
    p = PROMPTS[5]  # 70 tokens
    scores = {}
    for kv, unstack in (("none", True), (method, True), (method, False)):
        engine = Engine(model, unstack=unstack)
        slots = Slots(engine.weights, 2, 128, chunk=16, kv_block=16, kv_quantization=kv)
        rows = []
        for start in range(0, 64, 16):  # chunks after the first attend over the cache
            _, s = slots.prefill_scored(0, p[start:start + 16], start, False, GREEDY,
                                        p[start + 16])
            rows.append(np.asarray(s.logprob))
        scores[kv, unstack] = np.concatenate(rows)
        if unstack:
            nbytes = sum(x.nbytes for x in jax.tree.leaves(slots.cache))
            planned = footprint.kv_bytes(CFG, {"data": 1, "fsdp": 1, "tensor": 1},
                                         slots.shapes.groups, 128, kv)
            assert planned == nbytes
    np.testing.assert_allclose(scores[method, True], scores[method, False], rtol=1e-5, atol=1e-5)
    diff = np.abs(scores[method, True] - scores["none", True])
    assert 0 < diff.max() < (0.05 if method == "int8" else 0.3), diff.max()
    full = footprint.kv_bytes(CFG, {"data": 1, "fsdp": 1, "tensor": 1}, (2,), 128)
    assert footprint.kv_bytes(CFG, {"data": 1, "fsdp": 1, "tensor": 1}, (2,), 128, method) \
        == full // 4 + full // 4 // CFG.head_dim * 4  # fp32 -> a byte and a scale per head
    engine = Engine(model)
    slots = Slots(engine.weights, 2, 128, chunk=128, kv_block=16, kv_quantization=method)
    want = greedy(slots, 0, p, 8, 128)
    prefix = slots.extract(0, 60)
    assert prefix.nbytes == slots.prefix_bytes(60)
    assert isinstance(prefix.kv[0].groups[0][0].k, QKV)
    slots.insert(1, prefix)
    out = slots.prefill(1, p[60:], 60, True, GREEDY)
    got = [int(out.tokens[0])] + [int(slots.decode().tokens[1]) for _ in range(7)]
    assert got == want


def test_engine_generates_with_an_8bit_cache_on_eight_devices(one_device_mesh):
    """KV heads sharded over `tensor`, rows over `data`: the same tokens as on one device."""
    from llama2_jax.model import sharding
    cfg = TINY.replace(n_kv_heads=2)
    prompts = [PROMPTS[2], PROMPTS[4]]
    tokens = []
    for mesh in (one_device_mesh, sharding.make_mesh(data=2, fsdp=2, tensor=2)):
        engine = Engine(checkpoint.random_model(cfg, mesh, seed=3), kv_quantization="int8")
        tokens.append(engine.generate(prompts, max_new_tokens=6, params=GREEDY))
    assert tokens[0] == tokens[1]


def test_chat_setting_reaches_the_engine_and_bad_values_name_it():
    import ml_collections

    from llama2_jax import chat
    from tests.conftest import TOKENIZER
    config = chat.base_config()
    config.tokenizer_path = TOKENIZER
    config.model_preset = "tiny"
    config.model = ml_collections.ConfigDict(dict(vocab_size=32000))
    config.max_new_tokens = 4
    config.fsdp, config.tensor = -1, 1
    config.kv_quantization = "int4"
    with pytest.raises(chat.USER_ERRORS, match="kv_quantization='int4': expected one of none, "
                                               "int8, fp8"):
        chat.build(config, err=open("/dev/null", "w"))
    config.kv_quantization = "int8"
    built = chat.build(config, err=open("/dev/null", "w"))
    assert built.engine.kv_quantization == "int8"
    slots = built.engine.slots(1, 64)
    assert isinstance(jax.tree.leaves(slots.cache, is_leaf=lambda x: isinstance(x, QKV))[0], QKV)


def test_server_with_an_8bit_cache_reuses_prefixes(tmp_path_factory, one_device_mesh):
    """`serve --config.kv_quantization=int8` over HTTP: a prompt answered again from the
    prefix cache (its 8-bit keys/values and scales copied back) gives the same tokens, and
    several requests at once decode."""
    import concurrent.futures

    import openai

    from tests.conftest import save_random, serving
    cfg = TINY.replace(vocab_size=32000, max_seq_len=512)
    path = save_random(tmp_path_factory, one_device_mesh, "kv8", cfg, seed=5)
    prompt = list(np.random.default_rng(1).integers(3, 32000, 150))
    with serving(path, "kv8", max_slots=4, context_length=256, prefill_chunk=32,
                 prefix_cache_mb=8, kv_quantization="int8") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                               timeout=120)

        def ask(p):
            return client.completions.create(model="kv8", prompt=[int(t) for t in p],
                                             max_tokens=10, temperature=0,
                                             extra_body={"return_token_ids": True})
        miss = ask(prompt)
        hit = ask(prompt)
        assert miss.usage.prompt_tokens_details.cached_tokens == 0
        assert hit.usage.prompt_tokens_details.cached_tokens >= 128
        assert hit.choices[0].model_extra["token_ids"] == miss.choices[0].model_extra["token_ids"]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, [prompt[:40 + 20 * i] for i in range(4)]))
        assert all(len(a.choices[0].model_extra["token_ids"]) == 10 for a in answers)
