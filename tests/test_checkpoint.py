import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama2_jax
from llama2_jax.model import checkpoint, sharding
from llama2_jax.model.checkpoint import CheckpointError
from llama2_jax.model.config import TINY
from tests.conftest import TOKENIZER

CFG = TINY.replace(n_kv_heads=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, one_device_mesh):
    model = checkpoint.random_model(CFG, one_device_mesh, seed=3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    checkpoint.save(path, model, tokenizer_path=TOKENIZER)
    return path, model


def test_round_trip_on_one_and_eight_devices(saved):
    path, model = saved
    assert sorted(os.listdir(path)) == ["llama2_jax.json", "params", "tokenizer.model"]
    assert not [p for p in os.listdir(path.parent) if ".tmp-" in p]
    tokens = list(range(3, 20))
    want = llama2_jax.forward(model, tokens)
    for mesh in (sharding.make_mesh(devices=jax.devices()[:1]),
                 sharding.make_mesh(fsdp=2, tensor=4)):
        loaded = llama2_jax.load(path, mesh=mesh, dtype="float32")
        assert loaded.config == CFG
        for a, b in zip(jax.tree.leaves(checkpoint.params_of(loaded)),
                        jax.tree.leaves(checkpoint.params_of(model))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        wq = checkpoint.params_of(loaded)["layers"]["attention"]["wq"]
        assert wq.sharding.mesh.shape == mesh.shape  # restored straight into the target shards
        np.testing.assert_allclose(llama2_jax.forward(loaded, tokens), want, atol=2e-5)
    assert checkpoint.tokenizer_path(path).endswith("tokenizer.model")


def test_dtype_is_cast_on_load(saved):
    path, _ = saved
    loaded = llama2_jax.load(path, dtype="bfloat16")
    assert loaded.config.dtype == loaded.config.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(checkpoint.params_of(loaded))} == {
        jnp.dtype("bfloat16")}


def test_existing_directory_is_not_overwritten(saved, tmp_path):
    path, model = saved
    before = (path / "llama2_jax.json").read_text()
    with pytest.raises(CheckpointError, match="already exists"):
        checkpoint.save(path, model)
    assert (path / "llama2_jax.json").read_text() == before
    other = tmp_path / "user_data"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        checkpoint.save(other, model)
    assert (other / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_whole(saved, tmp_path):
    path, model = saved
    target = tmp_path / "again"
    checkpoint.save(target, model)
    checkpoint.save(target, model, overwrite=True)
    assert sorted(os.listdir(target)) == ["llama2_jax.json", "params"]
    assert not [p for p in os.listdir(tmp_path) if p != "again"]


def test_shape_mismatch_names_parameter(saved, tmp_path):
    path, _ = saved
    meta = json.loads((path / "llama2_jax.json").read_text())
    meta["model"]["ffn_dim"] = 96
    bad = tmp_path / "bad"
    bad.mkdir()
    os.symlink(path / "params", bad / "params")
    (bad / "llama2_jax.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"layers/feed_forward/w1 has shape \(2, 64, 128\)"
                                              r", the model config expects \(2, 64, 96\)"):
        llama2_jax.load(bad)


def test_missing_and_incomplete_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found: .*nowhere"):
        llama2_jax.load(tmp_path / "nowhere")
    (tmp_path / "half" / "params").mkdir(parents=True)  # what a killed write could leave
    with pytest.raises(CheckpointError, match="no llama2_jax.json"):
        llama2_jax.load(tmp_path / "half")
