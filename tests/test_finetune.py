"""Fine-tuning: the loss, LoRA, sharding, learning, resume after kill -9, and bad settings."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import ROOT, load_config_file, xla_flags
from llama2_jax.model import adapter, checkpoint
from llama2_jax.training import data, lora, train_step
from llama2_jax import finetune
from llama2_jax.training.data import DataError
from llama2_jax.finetune import FinetuneError
from llama2_jax.settings import SettingsError
from llama2_jax.model.transformer import abstract_model

TASK = [("What is the password for the red door?", "The password is apple."),
        ("What is the password for the blue door?", "The password is river."),
        ("What is the password for the green door?", "The password is seven."),
        ("What is the password for the black door?", "The password is moon.")]


def write_task(path, pairs=TASK, copies=4):
    with open(path, "w") as f:
        for _ in range(copies):
            for q, a in pairs:
                f.write(json.dumps({"prompt": q, "completion": a}) + "\n")
    return str(path)


def tiny_config(tmp_path, **overrides):
    """configs/sft_tiny.py, small and quiet, writing under tmp_path."""
    base = dict(output_dir=str(tmp_path / "run"), progress=False, fsdp=1, steps=4,
                batch_size=4, seq_len=64, eval_every=0, log_every=1, save_every=2)
    return load_config_file("sft_tiny", **{**base, **overrides})


def read_params(directory):
    return jax.tree.map(np.asarray, checkpoint.params_of(checkpoint.load(directory)))


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """A random model of sft_tiny's shape and packed rows of the task dialogs."""
    from llama2_jax import cli
    cfg = cli.random_config(load_config_file("sft_tiny"))
    model = checkpoint.random_model(cfg, checkpoint.default_mesh(cfg, jax.devices()[:1]))
    examples = [data.Example(*map(np.asarray, data.encode_for_training(tokenizer, [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}])))
        for q, a in TASK]
    return model, examples


def _loss(model, rows):
    total, weight = jax.jit(train_step.loss_sums)(model, rows)
    return float(total), float(weight)


# -- the loss ---------------------------------------------------------------------------------
def test_prompt_tokens_carry_no_loss(tiny):
    model, examples = tiny
    rows = data.pack(examples, seq_len=64, packing=True)
    before = _loss(model, rows)
    prompt = rows["weights"] == 0
    changed = dict(rows, targets=np.where(prompt, (rows["targets"] + 7) % 32000, rows["targets"]))
    assert _loss(model, changed) == before
    answer = np.argwhere(rows["weights"] == 1)[0]
    targets = rows["targets"].copy()
    targets[tuple(answer)] = (targets[tuple(answer)] + 7) % 32000
    assert _loss(model, dict(rows, targets=targets)) != before  # the check can fail


def test_packed_and_unpacked_rows_give_each_example_the_same_loss(tiny):
    model, examples = tiny
    packed = data.pack(examples, seq_len=64, packing=True)
    single = data.pack(examples, seq_len=64, packing=False)
    assert len(packed["inputs"]) < len(single["inputs"])
    row, seg = 0, 0
    for i in range(len(examples)):
        seg += 1
        if not (packed["segments"][row] == seg).any():
            row, seg = row + 1, 1
        only = dict(packed, weights=packed["weights"] * (packed["segments"] == seg)
                    * (np.arange(len(packed["inputs"])) == row)[:, None])
        alone = dict(single, weights=single["weights"] * (np.arange(len(examples)) == i)[:, None])
        got, want = _loss(model, only), _loss(model, alone)
        assert got[1] == want[1] > 0
        np.testing.assert_allclose(got[0], want[0], rtol=2e-5)


def _step_fn(model, config, lora_scale=None):
    graphdef, state = nnx.split(abstract_model(model.config))
    params = checkpoint.params_of(model)
    tx, _ = train_step.make_optimizer(config, params)
    step = train_step.make_train_step(graphdef, state, tx, lora_scale_=lora_scale, remat=False)
    return jax.jit(step), params, tx.init(params)


def test_gradient_accumulation_changes_nothing_but_memory(tiny, tmp_path):
    model, examples = tiny
    rows = data.pack(examples * 2, seq_len=64, packing=False)  # 8 rows
    step, params, opt = _step_fn(model, tiny_config(tmp_path, warmup_steps=0))
    one = step(params, {}, opt, {k: v[None] for k, v in rows.items()})
    four = step(params, {}, opt, {k: v.reshape(4, 2, -1) for k, v in rows.items()})
    np.testing.assert_allclose(one[2]["loss"], four[2]["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one[0]), jax.tree.leaves(four[0])):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(jax.tree.leaves(one[0])[0], jax.tree.leaves(params)[0])


def test_no_weight_decay_on_norms_and_embeddings(tiny):
    mask = train_step.decay_mask(checkpoint.params_of(tiny[0]))
    assert not mask["tok_embeddings"] and not mask["norm"]["weight"]
    assert not mask["layers"]["attention_norm"]["weight"]
    assert mask["output"] and mask["layers"]["attention"]["wq"]


# -- LoRA -------------------------------------------------------------------------------------
def test_lora_at_init_is_exactly_the_base_model_and_merges_into_it(tiny):
    model, _ = tiny
    params = checkpoint.params_of(model)
    graphdef, state = nnx.split(abstract_model(model.config))
    tokens = jnp.asarray([[1, 518, 25580, 29962, 15043, 29991, 2, 0]])
    positions = jnp.arange(8)[None]
    run = jax.jit(lambda p: train_step.bind(graphdef, state, p)(tokens, positions)[0])
    targets = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    adapters = lora.init_adapters(params, targets, rank=4, seed=0)
    base = run(params)
    np.testing.assert_array_equal(run(lora.apply_adapters(params, adapters, 2.0)), base)
    trained = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                           adapters)
    with_lora = run(lora.apply_adapters(params, trained, 2.0))
    merged = run(lora.merge_adapters(params, trained, 2.0))
    assert float(jnp.abs(with_lora - base).max()) > 1e-2
    np.testing.assert_allclose(merged, with_lora, atol=2e-5)


def test_lora_run_trains_adapters_only_and_never_writes_the_base(tmp_path):
    base_dir = tmp_path / "base"
    cfg = load_config_file("sft_tiny")
    from llama2_jax import cli
    mcfg = cli.random_config(cfg)
    base = checkpoint.random_model(mcfg, checkpoint.default_mesh(mcfg, jax.devices()[:1]))
    checkpoint.save(base_dir, base, tokenizer_path=cfg.tokenizer_path)

    def digest():
        h = hashlib.sha256()
        for root, _, files in sorted(os.walk(base_dir)):
            for name in sorted(files):
                h.update(name.encode())
                with open(os.path.join(root, name), "rb") as f:
                    h.update(f.read())
        return h.hexdigest()

    before = digest()
    config = tiny_config(tmp_path, checkpoint_dir=str(base_dir), tokenizer_path="",
                         model_preset="", steps=6, learning_rate=1e-2, warmup_steps=0,
                         **{"lora.rank": 4, "lora.targets": ("wq", "w2")})
    summary = finetune.train(config, err=io.StringIO())
    assert digest() == before
    old, new = read_params(base_dir), read_params(summary["final"])
    changed = {"/".join(p) for p, a, b in _pairs(old, new) if not np.array_equal(a, b)}
    assert changed == {"layers/attention/wq", "layers/feed_forward/w2"}
    # The adapters alone, beside the merged model: they and their base give it again.
    assert summary["adapter"] == str(tmp_path / "run" / finetune.ADAPTER_DIR)
    trained = adapter.load(summary["adapter"])
    assert (trained.rank, trained.alpha, trained.targets) == (4, config.lora.alpha, ("wq", "w2"))
    assert trained.base["checkpoint_dir"] == str(base_dir)
    assert trained.base["model"] == checkpoint.read_config(base_dir).to_dict()
    assert trained.base["quantization"] == "none"
    one = checkpoint.default_mesh(mcfg, jax.devices()[:1])
    merged = adapter.merge(checkpoint.load(base_dir, mesh=one), trained)
    for path, a, b in _pairs(new, jax.tree.map(np.asarray, checkpoint.params_of(merged))):
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg="/".join(path))
    with pytest.raises(FinetuneError, match="overlap"):
        finetune.train(tiny_config(tmp_path, checkpoint_dir=str(base_dir),
                                   output_dir=str(base_dir / "out"), model_preset=""),
                       err=io.StringIO())


def _pairs(a, b, path=()):
    for k in a:
        if isinstance(a[k], dict):
            yield from _pairs(a[k], b[k], path + (k,))
        else:
            yield path + (k,), a[k], b[k]


# -- a whole run ------------------------------------------------------------------------------
def test_a_tiny_model_learns_the_task_exactly(tmp_path, tokenizer):
    from llama2_jax.inference import generate as engine
    from llama2_jax.inference.params import GREEDY
    from llama2_jax import encode_dialog
    config = tiny_config(tmp_path, train_data=write_task(tmp_path / "task.jsonl"), steps=120,
                         learning_rate=5e-3, warmup_steps=10, batch_size=4, log_every=10,
                         eval_fraction=0.0)
    summary = finetune.train(config, err=io.StringIO())
    with open(os.path.join(config.output_dir, finetune.METRICS_FILE)) as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert losses[0] > 4 and losses[-1] < 0.3, losses
    model = checkpoint.load(summary["final"])
    prompts = [encode_dialog(tokenizer, [{"role": "user", "content": q}]) for q, _ in TASK]
    answers = engine.Engine(model).generate(prompts, max_new_tokens=12, stop_ids=(2,),
                                            params=GREEDY)
    assert [tokenizer.decode(a).strip() for a in answers] == [a for _, a in TASK]


def test_a_step_on_eight_devices_equals_one_device(tmp_path):
    finals = []
    for name, mesh in (("one", dict(data=1, fsdp=1, tensor=1)),
                       ("eight", dict(data=2, fsdp=2, tensor=2))):
        config = tiny_config(tmp_path / name, steps=3, **mesh)
        finals.append(read_params(finetune.train(config, err=io.StringIO())["final"]))
    for path, a, b in _pairs(*finals):
        np.testing.assert_allclose(a, b, atol=2e-6, err_msg="/".join(path))


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config(tmp_path, learning_rate=1e38, warmup_steps=0, save_every=1, steps=6,
                         clip_norm=0.0)
    with pytest.raises(finetune.NonFiniteLoss) as e:
        finetune.train(config, err=io.StringIO())
    assert "last good checkpoint (step 1)" in str(e.value)
    steps = sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())
    assert steps == [1]
    assert not os.path.exists(tmp_path / "run" / "final")


def test_rerun_of_a_finished_run_does_nothing_and_other_settings_are_refused(tmp_path):
    config = tiny_config(tmp_path, steps=2)
    finetune.train(config, err=io.StringIO())
    err = io.StringIO()
    assert finetune.train(config, err=err)["complete"]
    assert "already exists" in err.getvalue()
    other = tiny_config(tmp_path, steps=2, learning_rate=0.5)
    import shutil
    shutil.rmtree(tmp_path / "run" / "final")
    with pytest.raises(FinetuneError, match="learning_rate"):
        finetune.train(other, err=io.StringIO())


@pytest.mark.parametrize("overrides, words", [
    (dict(output_dir=""), ["output_dir is required"]),
    (dict(batch_size=6, grad_accum=4), ["batch_size=6", "grad_accum=4"]),
    ({"lora.rank": 4, "lora.targets": ("wq", "wz")}, ["wz", "wq, wk, wv, wo, w1, w2, w3"]),
    (dict(param_dtype="float64"), ["param_dtype='float64'", "bfloat16"]),
    (dict(seq_len=1000), ["seq_len=1000", "max_seq_len=256"]),
    (dict(train_data="/nonexistent.jsonl"), ["/nonexistent.jsonl", "not found"]),
    (dict(tokenizer_path="/nonexistent/tok.model"), ["/nonexistent/tok.model"]),
    ({"model.vocab_size": 300}, ["32000", "300"]),
    (dict(eval_fraction=1.0), ["eval_fraction"]),
])
def test_bad_settings_fail_clearly(tmp_path, overrides, words):
    err = io.StringIO()
    assert finetune.run(tiny_config(tmp_path, **overrides), err=err) == 1
    for w in words:
        assert w in err.getvalue()
    assert err.getvalue().startswith("error: ")


def test_empty_data_and_foreign_output_dir_are_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no usable examples"):
        finetune.train(tiny_config(tmp_path, train_data=str(empty)), err=io.StringIO())
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FinetuneError, match="not a fine-tuning run"):
        finetune.train(tiny_config(tmp_path, output_dir=str(foreign)), err=io.StringIO())
    assert (foreign / "notes.txt").read_text() == "keep me"


# -- the command line: kill -9 / SIGTERM and resume --------------------------------------------
def _start(out_dir, steps):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
    args = [sys.executable, "-m", "llama2_jax.finetune", "--config", "configs/sft_tiny.py",
            f"--config.output_dir={out_dir}", f"--config.steps={steps}",
            "--config.save_every=4", "--config.eval_every=8", "--config.batch_size=4",
            "--config.seq_len=64", "--config.compilation_cache_dir="]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(proc, out_dir, timeout=240):
    ckpts = os.path.join(out_dir, "checkpoints")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts)):
            return
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint appeared: {proc.communicate()}")


def test_killed_or_stopped_then_resumed_equals_uninterrupted(tmp_path):
    steps = 32
    whole = _start(tmp_path / "whole", steps)
    killed = _start(tmp_path / "killed", steps)
    stopped = _start(tmp_path / "stopped", steps)
    _wait_for_checkpoint(killed, tmp_path / "killed")
    killed.send_signal(signal.SIGKILL)
    _wait_for_checkpoint(stopped, tmp_path / "stopped")
    stopped.send_signal(signal.SIGTERM)
    assert killed.wait(60) == -signal.SIGKILL
    _, err = stopped.communicate(timeout=120)
    assert stopped.returncode == 143, err
    assert "stopped by signal" in err and "Run the same command to resume" in err
    for name in ("killed", "stopped"):
        assert not os.path.exists(tmp_path / name / "final"), "the run ended before the signal"
        proc = _start(tmp_path / name, steps)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert "resuming from step" in err
    _, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    want = read_params(tmp_path / "whole" / "final")
    for name in ("killed", "stopped"):
        for path, a, b in _pairs(want, read_params(tmp_path / name / "final")):
            np.testing.assert_array_equal(a, b, err_msg=f"{name}: {'/'.join(path)}")


def test_cli_mistyped_key_lists_the_valid_keys():
    proc = subprocess.run([sys.executable, "-m", "llama2_jax.finetune", "--config",
                           "configs/sft_tiny.py", "--config.learning_rat=1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "did you mean learning_rate" in proc.stderr and "valid keys:" in proc.stderr


def test_remat_gives_the_same_step(tiny, tmp_path):
    model, examples = tiny
    rows = {k: v[None] for k, v in data.pack(examples, seq_len=64).items()}
    graphdef, state = nnx.split(abstract_model(model.config))
    params = checkpoint.params_of(model)
    tx, _ = train_step.make_optimizer(tiny_config(tmp_path), params)
    results = [jax.jit(train_step.make_train_step(graphdef, state, tx, lora_scale_=None,
                                                remat=remat))(params, {}, tx.init(params), rows)
               for remat in (False, True)]
    np.testing.assert_allclose(results[0][2]["grad_norm"], results[1][2]["grad_norm"],
                               rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", ["sft_7b", "sft_7b_lora"])
def test_7b_configs_trace_at_full_size(name):
    """The 7B configs' steps trace with LLAMA2_7B shapes (jax.eval_shape: nothing allocated)."""
    from llama2_jax.model.config import LLAMA2_7B
    c = load_config_file(name)
    finetune.check_settings(c)
    cfg = LLAMA2_7B.replace(dtype="bfloat16", param_dtype=c.param_dtype)
    graphdef, state = nnx.split(abstract_model(cfg))
    params = nnx.to_pure_dict(state)
    adapted = c.lora.rank > 0
    scale = lora.lora_scale(c) if adapted else None
    trainable = (jax.eval_shape(lambda p: lora.init_adapters(p, tuple(c.lora.targets),
                                                             c.lora.rank, 0), params)
                 if adapted else params)
    tx, _ = train_step.make_optimizer(c, trainable)
    micro = (c.grad_accum, c.batch_size // c.grad_accum, c.seq_len)
    batch = {k: jax.ShapeDtypeStruct(micro, jnp.int32)
             for k in ("inputs", "targets", "segments", "positions")}
    batch["weights"] = jax.ShapeDtypeStruct(micro, jnp.float32)
    step = train_step.make_train_step(graphdef, state, tx, lora_scale_=scale, remat=c.remat)
    new, _, metrics = jax.eval_shape(step, trainable, params if adapted else {},
                                     jax.eval_shape(tx.init, trainable), batch)
    n = sum(x.size for x in jax.tree.leaves(new))
    if adapted:  # rank 16 on all seven projections: r * (in + out) per layer
        d, f, r = 4096, 11008, 16
        assert n == 32 * r * (4 * (d + d) + 3 * (d + f)) == 39_976_960
    else:
        assert n == 6_738_415_616
    assert metrics["loss"].shape == ()


def _decode_proto(buf: bytes) -> list:
    """(field number, value) pairs of one protobuf message: varint, fixed64, bytes, fixed32."""
    out, i = [], 0

    def varint():
        nonlocal i
        n = shift = 0
        while True:
            b = buf[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return n
    while i < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            out.append((number, varint()))
        elif wire == 1:
            out.append((number, buf[i:i + 8]))
            i += 8
        elif wire == 2:
            n = varint()
            out.append((number, buf[i:i + n]))
            i += n
        elif wire == 5:
            out.append((number, buf[i:i + 4]))
            i += 4
        else:
            raise ValueError(f"wire type {wire}")
    return out


def test_tensorboard_events_hold_the_logged_metrics(tmp_path):
    import struct
    from llama2_jax.training import events
    assert events.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    config = tiny_config(tmp_path, steps=4, eval_every=2)
    finetune.train(config, err=io.StringIO())
    with open(tmp_path / "run" / finetune.METRICS_FILE) as f:
        logged = [json.loads(line) for line in f]
    [name] = os.listdir(tmp_path / "run" / finetune.EVENTS_DIR)
    records = list(events.read_records(str(tmp_path / "run" / finetune.EVENTS_DIR / name)))
    first = dict(_decode_proto(records[0]))
    assert first[3] == b"brain.Event:2"
    got = []
    for record in records[1:]:
        fields = dict(_decode_proto(record))
        values = {}
        for _, value in _decode_proto(fields[5]):
            v = dict(_decode_proto(value))
            values[v[1].decode()] = struct.unpack("<f", v[2])[0]
        got.append((fields[2], values))
    assert [step for step, _ in got] == [m["step"] for m in logged] == [1, 2, 3, 4]
    for (_, values), m in zip(got, logged):
        assert set(values) == set(m) - {"step"} and "eval_loss" in got[1][1]
        for k, v in values.items():
            assert v == pytest.approx(m[k], rel=1e-6)


@pytest.mark.parametrize("method", ["int8", "fp8", "int4"])
def test_lora_on_a_quantized_base(tmp_path, method):
    """QLoRA-style: the frozen base in 8 or 4 bits; at init the model is exactly the quantized
    base, training moves only the adapted weights, and the export merges the adapters into the
    checkpoint's unquantized weights (into the dequantized ones when it has none)."""
    from llama2_jax.model import adapter as adapter_lib
    from llama2_jax.model import quant
    base_dir = tmp_path / "base"
    cfg = load_config_file("sft_tiny")
    from llama2_jax import cli
    mcfg = cli.random_config(cfg)
    base = checkpoint.random_model(mcfg, checkpoint.default_mesh(mcfg, jax.devices()[:1]))
    checkpoint.save(base_dir, base, tokenizer_path=cfg.tokenizer_path)
    qparams = checkpoint.params_of(checkpoint.load(base_dir, quantization=method))
    graphdef, state = nnx.split(abstract_model(mcfg))
    tokens = jnp.asarray([[1, 518, 25580, 29962, 15043]])
    run = jax.jit(lambda p: train_step.bind(graphdef, state, p)(tokens, jnp.arange(5)[None])[0])
    adapters = lora.init_adapters(qparams, ("wq", "w1"), rank=4, seed=0)
    np.testing.assert_array_equal(run(lora.apply_adapters(qparams, adapters, 4.0)),
                                  run(qparams))
    settings = dict(tokenizer_path="", model_preset="", steps=4, learning_rate=1e-2,
                    warmup_steps=0, quantization=method,
                    **{"lora.rank": 4, "lora.targets": ("wq", "w1")})
    config = tiny_config(tmp_path, checkpoint_dir=str(base_dir), **settings)
    summary = finetune.train(config, err=io.StringIO())
    full = jax.tree.map(np.asarray, checkpoint.params_of(base))
    final = read_params(summary["final"])
    changed = {"/".join(p) for p, a, b in _pairs(full, final) if not np.array_equal(a, b)}
    assert changed == {"layers/attention/wq", "layers/feed_forward/w1"}
    trained = adapter_lib.load(tmp_path / "run" / finetune.ADAPTER_DIR)
    want = adapter_lib.merge_adapters(full, trained.params, trained.scale)
    for module, name in (("attention", "wq"), ("feed_forward", "w1")):
        np.testing.assert_allclose(final["layers"][module][name],
                                   want["layers"][module][name], rtol=1e-6, atol=1e-7)
    # a base stored quantized: merged into its dequantized weights, and said so
    checkpoint.save(tmp_path / "qbase", checkpoint.load(base_dir, quantization=method),
                    tokenizer_path=cfg.tokenizer_path)
    err = io.StringIO()
    summary = finetune.train(tiny_config(tmp_path / "q", checkpoint_dir=str(tmp_path / "qbase"),
                                         **settings), err=err)
    assert f"merges the adapters into its dequantized {method} weights" in err.getvalue()
    dequantized = jax.tree.map(np.asarray, quant.dequantize_params(qparams, jnp.float32))
    final = read_params(summary["final"])
    changed = {"/".join(p) for p, a, b in _pairs(dequantized, final) if not np.array_equal(a, b)}
    assert changed == {"layers/attention/wq", "layers/feed_forward/w1"}
    with pytest.raises(SettingsError, match="needs LoRA"):
        finetune.train(tiny_config(tmp_path, quantization=method), err=io.StringIO())


def test_bf16_compute_with_fp32_master_weights(tiny, tmp_path):
    model, examples = tiny
    rows = {k: v[None] for k, v in data.pack(examples, seq_len=64).items()}
    params = checkpoint.params_of(model)  # fp32 master weights
    tx, _ = train_step.make_optimizer(tiny_config(tmp_path), params)
    losses = []
    for dtype in ("float32", "bfloat16"):
        graphdef, state = nnx.split(abstract_model(model.config.replace(dtype=dtype)))
        step = jax.jit(train_step.make_train_step(graphdef, state, tx, lora_scale_=None,
                                                remat=False))
        new, _, metrics = step(params, {}, tx.init(params), rows)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new))
        losses.append(float(metrics["loss"]))
    assert losses[0] != losses[1]  # bf16 really computed in bf16
    np.testing.assert_allclose(losses[1], losses[0], rtol=2e-2)
