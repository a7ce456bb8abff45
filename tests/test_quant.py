"""int8 / FP8 / int4 weights: error bounds, logits of quantized tiny models, quantized checkpoints
on one and eight devices, converter flag vs load-time quantization, bad settings."""

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import llama2_jax
from convert import hf_to_orbax, meta_to_orbax
from llama2_jax import chat
from llama2_jax.model import checkpoint, int4, quant, sharding
from llama2_jax.model.checkpoint import CheckpointError
from llama2_jax.model.config import TINY, TINY_GQA, ConfigError
from llama2_jax.inference.generate import Engine
from llama2_jax.model.quant import QArray
from llama2_jax.inference.params import GREEDY
from tests import hf_reference as ref
from tests import meta_reference as meta
from tests.conftest import TOKENIZER

TOKENS = [1, 17, 99, 3, 250, 42, 7, 128, 64, 5, 200, 31]
METHODS = ("int8", "fp8", "int4")


def channel_weights(shape, seed=0):
    """Weights whose output channels (last axis) differ in size by up to 1000x, so a scale
    shared across channels, or taken along the wrong axis, breaks the per-channel bounds."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    return w * np.logspace(-3, 0, shape[-1], dtype=np.float32)


def dequantized(qa: QArray) -> np.ndarray:
    return np.asarray(qa.dequantize(jnp.float32))


def test_int8_round_trip_error_is_at_most_half_a_step():
    w = channel_weights((3, 48, 40))  # [L, in, out]
    qa = quant.quantize(w, "int8", n_in=1, n_lead=1)
    assert qa.q.dtype == jnp.int8 and qa.scale.shape == (3, 40) and qa.n_out == 1
    scale = np.asarray(qa.scale)
    np.testing.assert_allclose(scale, np.abs(w).max(axis=1) / 127, rtol=1e-6)
    assert (np.abs(np.asarray(qa.q)).max(axis=1) == 127).all()  # every channel uses its range
    err = np.abs(dequantized(qa) - w)
    assert (err <= scale[:, None, :] * (0.5 + 1e-5)).all(), (err / scale[:, None, :]).max()


def test_fp8_round_trip_error_is_e4m3_rounding():
    w = channel_weights((2, 4, 16, 24), seed=1)  # like wo: [L, N, H, out]
    qa = quant.quantize(w, "fp8", n_in=2, n_lead=1)
    assert qa.q.dtype == jnp.float8_e4m3fn and qa.scale.shape == (2, 24)
    scale = np.asarray(qa.scale)[:, None, None, :]
    assert np.isfinite(np.asarray(qa.q).astype(np.float32)).all()
    err = np.abs(dequantized(qa) - w)
    # 3 mantissa bits: half a step is 2^-4 of the value; subnormals step by 2^-9 * scale.
    bound = np.maximum(np.abs(w) * 2.0**-4, scale * 2.0**-10) * (1 + 1e-5)
    assert (err <= bound).all(), (err / bound).max()


def test_zero_channel_and_all_zero_weight():
    w = channel_weights((8, 5))
    w[:, 2] = 0
    for method in METHODS:
        qa = quant.quantize(w, method, n_in=1)
        assert (np.asarray(qa.scale)[..., 2] == 1.0).all() and np.isfinite(dequantized(qa)).all()
        np.testing.assert_array_equal(dequantized(qa)[:, 2], 0)


@pytest.mark.parametrize("method", METHODS)
def test_einsum_of_views_equals_dequantized_matmul(method):
    w = channel_weights((4, 8, 32))  # wo-like [N, H, D]
    qa = quant.quantize(w, method, n_in=2)
    x = np.random.default_rng(2).standard_normal((2, 3, 32)).astype(np.float32)
    view = qa.reshape(32, 32)
    # int4: wo's input axes [N, H] hold groups of H (8) inputs: a scale per head and channel
    assert view.shape == (32, 32) and view.scale.shape == ((4, 32) if method == "int4" else (32,))
    got = view.einsum("BTQ,QD->BTD", x)
    want = x @ dequantized(qa).reshape(32, 32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    wq = quant.quantize(channel_weights((32, 4, 8)), method, n_in=1)  # wq-like [D, N, H]
    flat = wq[...].reshape(32, 32)
    assert flat.scale.shape == ((1, 32) if method == "int4" else (32,)) and flat.n_out == 1
    np.testing.assert_allclose(flat.einsum("BTD,DQ->BTQ", x),
                               x @ dequantized(wq).reshape(32, 32), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        wq.einsum("BTD,DNH->BTHN", x)  # output axes out of the weight's order


def group_weights(shape, seed=0):
    """[in, out] weights whose groups of 128 inputs differ in size by 100x, and whose output
    channels differ by 1000x: a scale shared across groups or channels breaks the bounds."""
    w = channel_weights(shape, seed)
    return w * np.logspace(-2, 0, shape[0] // 128, dtype=np.float32).repeat(128)[:, None]


def test_int4_round_trip_error_is_at_most_half_a_step_of_its_group():
    w = group_weights((512, 40))
    qa = quant.quantize(np.stack([w, -w]), "int4", n_in=1, n_lead=1)  # [L, in, out]
    assert qa.method == "int4" and qa.group == 128 and qa.scale.shape == (2, 4, 40)
    assert qa.q.dtype == jnp.uint8 and qa.q.shape == (2, 4, 64, 40) and qa.shape == (2, 512, 40)
    scale = np.asarray(qa.scale)
    np.testing.assert_allclose(scale[0], np.abs(w).reshape(4, 128, 40).max(axis=1) / 7,
                               rtol=1e-6)
    q = np.asarray(qa.codes())
    assert q.shape == (2, 512, 40) and q.min() >= -7 and q.max() <= 7
    # two per byte: in each group, byte j holds input j (low nibble) and j + 64 (high)
    packed = np.asarray(qa.q).reshape(2, 4, 64, 40)
    nibbles = q.reshape(2, 4, 128, 40).astype(np.int16) & 0xF
    np.testing.assert_array_equal(packed, nibbles[:, :, :64] | (nibbles[:, :, 64:] << 4))
    assert (np.abs(q).reshape(2, 4, 128, 40).max(axis=2) == 7).all()  # every group's range
    err = np.abs(dequantized(qa) - np.stack([w, -w]))
    bound = np.repeat(scale, 128, axis=1) * (0.5 + 1e-5)
    assert (err <= bound).all(), (err / bound).max()
    # packed two per byte: what the planner counts
    assert qa.nbytes == 2 * 512 * 40 // 2 + 2 * 4 * 40 * 4
    assert qa[1].n_lead == 0 and qa[1].scale.shape == (4, 40) and qa[1].shape == (512, 40)
    # the decode form (group by group) and the prefill form (dequantized) of a matmul
    layer = qa[1]
    for rows in (3, 100):
        x = np.random.default_rng(rows).standard_normal((rows, 512)).astype(np.float32)
        np.testing.assert_allclose(layer.einsum("BD,DF->BF", x), x @ dequantized(qa)[1],
                                   rtol=1e-4, atol=1e-4)
    # other input lengths: the largest even divisor up to 128, or one group per output channel
    assert [int4.group_size(n) for n in (11008, 352, 192, 64, 16, 134)] == \
        [128, 88, 96, 64, 16, 134]
    with pytest.raises(ConfigError, match="int4 quantization of layers/attention/wq: its input "
                                          "axis of 257 values"):
        quant.quantize_param(("layers", "attention", "wq"), np.ones((1, 257, 2, 8)), "int4")


# A model whose input axes hold several int4 groups of 128 (TINY's are shorter than a group):
# wq/wk/wv/w1/w3/output 2 groups, w2 4, wo one per head.
GROUPED = TINY.replace(dim=256, ffn_dim=512, n_heads=2, n_kv_heads=2)


def test_int4_model_has_groups_and_equals_its_dequantized_weights(one_device_mesh):
    hf = ref.hf_model(GROUPED, seed=7)
    model = checkpoint.from_params(GROUPED, ref.params_from_hf(hf, GROUPED), one_device_mesh)
    qmodel = quant.quantize_model(model, "int4")
    params = checkpoint.params_of(qmodel)
    layers = params["layers"]
    assert layers["feed_forward"]["w2"].scale.shape == (2, 4, 256)
    assert layers["attention"]["wo"].scale.shape == (2, 2, 1, 256)
    assert params["output"].scale.shape == (2, 256)
    int8 = checkpoint.params_of(quant.quantize_model(model, "int8"))["layers"]
    qarrays = [[w for w in jax.tree.leaves(p, is_leaf=lambda x: isinstance(x, QArray))
                if isinstance(w, QArray)] for p in (layers, int8)]
    nbytes = [sum(w.nbytes for w in ws) for ws in qarrays]
    assert nbytes[0] == sum(math.prod(w.shape) // 2 + w.scale.size * 4 for w in qarrays[0])
    assert nbytes[0] < 0.55 * nbytes[1]
    full = llama2_jax.forward(model, TOKENS)
    got = llama2_jax.forward(qmodel, TOKENS)
    deq = plain_with(model, quant.dequantize_params(params, jnp.float32))
    # (12 rows multiply group by group: float32 sums in another order)
    np.testing.assert_allclose(got, llama2_jax.forward(deq, TOKENS), rtol=1e-4, atol=1e-4)
    # 4 bits on random weights: 18x int8's step; this model's logits move by ~half their
    # spread (int8: 3%). benchmarks/quant_quality.py measures trained models.
    rel = np.sqrt(np.mean((got - full) ** 2)) / full.std()
    assert 0 < rel <= 0.7, rel
    # the engine's decode (per-layer weights and scanned) gives the dequantized model's tokens
    for unstack in (True, False):
        got = Engine(qmodel, unstack=unstack).generate([TOKENS[:6]], max_new_tokens=6,
                                                       params=GREEDY)
        assert got == Engine(deq, unstack=unstack).generate([TOKENS[:6]], max_new_tokens=6,
                                                            params=GREEDY)


def plain_with(model, params):
    """A copy of `model` holding `params` (e.g. dequantized weights) as ordinary arrays."""
    from flax import nnx
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def models(one_device_mesh):
    """Tiny random models (HF-style wide weights, so logits are far from uniform)."""
    out = {}
    for name, cfg in (("tiny", TINY), ("tiny_gqa", TINY_GQA)):
        hf = ref.hf_model(cfg, seed=len(out))
        out[name] = checkpoint.from_params(cfg, ref.params_from_hf(hf, cfg), one_device_mesh)
    return out


@pytest.mark.parametrize("name", ["tiny", "tiny_gqa"])
@pytest.mark.parametrize("method,tol", [("int8", 0.04), ("fp8", 0.15), ("int4", 0.8)])
def test_quantized_logits_close_to_full_precision(models, name, method, tol):
    model = models[name]
    qmodel = quant.quantize_model(model, method)
    params = checkpoint.params_of(qmodel)
    assert quant.method_of(params) == method
    assert not isinstance(params["tok_embeddings"], QArray)
    assert isinstance(params["output"], QArray)
    assert quant.weight_bytes(qmodel) < (0.3 if method == "int4" else 0.45) * \
        quant.weight_bytes(model)
    full = llama2_jax.forward(model, TOKENS)
    got = llama2_jax.forward(qmodel, TOKENS)
    # Exactly the model with the dequantized weights: x @ q * scale == x @ (q * scale).
    deq = plain_with(model, quant.dequantize_params(params, jnp.float32))
    np.testing.assert_allclose(got, llama2_jax.forward(deq, TOKENS), rtol=1e-5, atol=1e-5)
    span = np.abs(full).max()
    assert 0 < np.abs(got - full).max() <= tol * span, np.abs(got - full).max() / span
    assert (got.argmax(-1) == full.argmax(-1)).mean() >= (0.25 if method == "int4" else 0.8)


@pytest.mark.parametrize("unstack", [True, False])
def test_engine_generates_with_int8_weights(models, unstack):
    model = models["tiny_gqa"]
    qmodel = quant.quantize_model(model, "int8")
    deq = plain_with(model, quant.dequantize_params(checkpoint.params_of(qmodel), jnp.float32))
    prompts = [TOKENS[:5], TOKENS[:9]]
    got = Engine(qmodel, unstack=unstack).generate(prompts, max_new_tokens=8, params=GREEDY)
    want = Engine(deq, unstack=unstack).generate(prompts, max_new_tokens=8, params=GREEDY)
    assert got == want and all(len(g) == 8 for g in got)
    # The engine's per-layer copy holds 8-bit weights too.
    layers = Engine(qmodel, unstack=True).weights.unstacked[0]
    weights = [x for x in jax.tree.leaves(layers, is_leaf=lambda x: isinstance(x, QArray))
               if isinstance(x, QArray)]
    assert len(weights) == 7 and {w.q.dtype for w in weights} == {jnp.dtype(jnp.int8)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, models):
    """The tiny_gqa model saved unquantized and saved after quantizing each way."""
    root = tmp_path_factory.mktemp("quant")
    model = models["tiny_gqa"]
    checkpoint.save(root / "none", model)
    for method in METHODS:
        checkpoint.save(root / method, quant.quantize_model(model, method))
    return root


def leaves_equal(a, b):
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x).astype(np.float32),
                                      np.asarray(y).astype(np.float32))


@pytest.mark.parametrize("method", METHODS)
def test_quantized_checkpoint_on_one_and_eight_devices(saved, models, method):
    meta_file = json.loads((saved / method / "llama2_jax.json").read_text())
    assert meta_file["format"] == 2 and meta_file["quantization"] == method
    plain_meta = json.loads((saved / "none" / "llama2_jax.json").read_text())
    assert plain_meta["format"] == 1 and "quantization" not in plain_meta  # old loaders read it
    want = llama2_jax.forward(quant.quantize_model(models["tiny_gqa"], method), TOKENS)
    params = {}
    for mesh in (sharding.make_mesh(devices=jax.devices()[:1]),
                 sharding.make_mesh(data=2, fsdp=2, tensor=2)):
        stored = llama2_jax.load(saved / method, mesh=mesh)
        asked = llama2_jax.load(saved / "none", mesh=mesh, quantization=method)
        for model in (stored, asked):
            np.testing.assert_allclose(llama2_jax.forward(model, TOKENS), want,
                                       rtol=1e-5, atol=1e-5)
        params[mesh.size] = checkpoint.params_of(stored)
        leaves_equal(params[mesh.size], checkpoint.params_of(asked))
    leaves_equal(params[1], params[8])
    wq = params[8]["layers"]["attention"]["wq"]
    # Scales are split like their weight's output axes (heads over `tensor`, here); int4's
    # groups like the input axis, where they divide (tiny_gqa's 64 inputs are one group).
    grouped = (None,) if method == "int4" else ()
    # int4 codes [L, groups, group / 2, N, H]: one group (64 inputs), so each group's bytes
    # are split over fsdp=2
    assert tuple(wq.q.sharding.spec) == ((None, None, "fsdp", "tensor", None) if grouped
                                         else (None, "fsdp", "tensor", None))
    assert tuple(wq.scale.sharding.spec) == (None, *grouped, "tensor", None)
    assert tuple(params[8]["output"].scale.sharding.spec) == (*grouped, "tensor")


def test_dequantizing_and_refusing_the_other_format(saved):
    stored = checkpoint.params_of(llama2_jax.load(saved / "int8"))
    plain = checkpoint.params_of(llama2_jax.load(saved / "int8", quantization="none"))
    assert quant.method_of(plain) == "none"
    np.testing.assert_array_equal(plain["layers"]["feed_forward"]["w2"],
                                  dequantized(stored["layers"]["feed_forward"]["w2"]))
    with pytest.raises(CheckpointError, match="holds int8 weights: load it with "
                                              "quantization='int8'"):
        llama2_jax.load(saved / "int8", quantization="fp8")


def test_saving_a_loaded_quantized_model_round_trips(saved, tmp_path):
    model = llama2_jax.load(saved / "fp8")
    checkpoint.save(tmp_path / "again", model)
    leaves_equal(checkpoint.params_of(llama2_jax.load(tmp_path / "again")),
                 checkpoint.params_of(model))


@pytest.mark.parametrize("kind", ["hf", "meta"])
@pytest.mark.parametrize("method", METHODS)
def test_converter_flag_equals_load_time_quantization(kind, method, tmp_path):
    cfg = TINY_GQA
    hf = ref.hf_model(cfg, seed=5)
    if kind == "hf":
        hf.save_pretrained(tmp_path / "src")
        convert = hf_to_orbax.convert
    else:
        meta.write_meta(str(tmp_path / "src"), hf, cfg, 2)
        convert = meta_to_orbax.convert
    convert(str(tmp_path / "src"), str(tmp_path / "plain"), progress=False)
    convert(str(tmp_path / "src"), str(tmp_path / "q"), progress=False, quantization=method)
    on_disk = llama2_jax.load(tmp_path / "q")
    at_load = llama2_jax.load(tmp_path / "plain", quantization=method)
    assert quant.method_of(checkpoint.params_of(on_disk)) == method
    leaves_equal(checkpoint.params_of(on_disk), checkpoint.params_of(at_load))
    with pytest.raises(Exception, match="--verify checks exact conversions"):
        convert(str(tmp_path / "src"), str(tmp_path / "v"), progress=False,
                quantization=method, verify_logits=True)


def test_bad_quantization_values_list_the_valid_ones(saved, models):
    valid = "quantization must be one of none, int8, fp8, int4, got 'int3'"
    with pytest.raises(ConfigError, match=valid):
        llama2_jax.load(saved / "none", quantization="int3")
    with pytest.raises(ConfigError, match=valid):
        quant.quantize_model(models["tiny"], "int3")
    config = chat.base_config()
    config.tokenizer_path = TOKENIZER
    config.model_preset = "tiny"
    config.model = ml_collections.ConfigDict(dict(vocab_size=32000))
    config.max_new_tokens = 16
    config.fsdp, config.tensor = -1, 1
    config.quantization = "int3"
    with pytest.raises(chat.USER_ERRORS, match=valid):
        chat.build(config, err=open("/dev/null", "w"))
    config.quantization = "int8"
    built = chat.build(config, err=open("/dev/null", "w"))
    assert quant.method_of(nnx_params(built.engine)) == "int8"


def nnx_params(engine):
    from flax import nnx
    return nnx.to_pure_dict(engine.weights.state)


def test_native_fp8_path_multiplies_e4m3_activations(models):
    """The GPU path (FP8 x FP8 dot), run on CPU: against numpy with ml_dtypes' e4m3."""
    import ml_dtypes
    assert not quant.has_fp8_matmuls()  # native_fp8=None ("where the hardware has them")
    w = channel_weights((64, 24), seed=3)
    x = np.random.default_rng(4).standard_normal((2, 3, 64)).astype(np.float32)
    upcast = quant.quantize(w, "fp8", n_in=1)  # off by default: weights are upcast instead
    qa = quant.quantize(w, "fp8", n_in=1, native=True)
    assert not upcast.native and qa.native and qa.reshape(64, 24).native
    got = np.asarray(qa.einsum("BTD,DQ->BTQ", x))
    assert np.abs(got - np.asarray(upcast.einsum("BTD,DQ->BTQ", x))).max() > 0
    xs = np.abs(x).max(-1, keepdims=True) / 448
    x8 = (x / xs).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    want = (x8 @ np.asarray(qa.q).astype(np.float32)) * xs * np.asarray(qa.scale)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    full = llama2_jax.forward(models["tiny"], TOKENS)
    fp8 = llama2_jax.forward(quant.quantize_model(models["tiny"], "fp8", native_fp8=True),
                             TOKENS)
    assert 0 < np.abs(fp8 - full).max() <= 0.15 * np.abs(full).max()
    weight_only = quant.quantize_model(models["tiny"], "fp8")
    assert not (llama2_jax.forward(weight_only, TOKENS) == fp8).all()
    switched = quant.use_native_fp8(weight_only, True)  # a loaded model, switched over
    np.testing.assert_array_equal(llama2_jax.forward(switched, TOKENS), fp8)


def test_export_to_hf_refuses_quantized_checkpoints(saved, tmp_path):
    from convert import orbax_to_hf
    from convert.common import ConversionError
    with pytest.raises(ConversionError, match="holds fp8 weights"):
        orbax_to_hf.export(str(saved / "fp8"), str(tmp_path / "hf"), progress=False)
    assert not (tmp_path / "hf").exists()


def test_int4_load_of_a_134m_shaped_checkpoint_is_what_the_planner_counts(tmp_path,
                                                                          one_device_mesh):
    """BENCH_134M's shapes (2 of its layers): a bf16 checkpoint loaded as int4 layer by layer
    equals the loaded model quantized in memory, in groups of 128 (64 in wo, a head), and its
    bytes are the planner's."""
    from llama2_jax import footprint
    from llama2_jax.model.config import BENCH_134M
    cfg = BENCH_134M.replace(n_layers=2).with_dtype("bfloat16")
    checkpoint.save(tmp_path / "bf16", checkpoint.random_model(cfg, one_device_mesh, seed=1))
    loaded = llama2_jax.load(tmp_path / "bf16", mesh=one_device_mesh, quantization="int4")
    plain = llama2_jax.load(tmp_path / "bf16", mesh=one_device_mesh)
    params = checkpoint.params_of(loaded)
    in_memory = checkpoint.params_of(quant.quantize_model(plain, "int4"))
    # beside quantized weights the table stays in the checkpoint's bf16 (float32 compute here)
    assert (params["tok_embeddings"].dtype, in_memory["tok_embeddings"].dtype) == \
        (jnp.bfloat16, jnp.float32)
    in_memory["tok_embeddings"] = in_memory["tok_embeddings"].astype(jnp.bfloat16)
    leaves_equal(params, in_memory)
    groups = {w.group for w in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray))
              if isinstance(w, QArray)}
    assert groups == {128, 64}  # wo's groups stay within a head (head_dim 64 here)
    planned = footprint.weight_bytes(loaded.config, {"data": 1, "fsdp": 1, "tensor": 1}, "int4")
    assert sum(planned.values()) == quant.weight_bytes(loaded)
    got = llama2_jax.forward(loaded, TOKENS)
    want = llama2_jax.forward(plain_with(plain, quant.dequantize_params(params, jnp.float32)),
                              TOKENS)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)  # bf16 compute
