"""Converters on tiny checkpoints made with the real libraries, checked against transformers.

Meta shards are written with torch.save, split as Meta's model-parallel code splits them
(tests/meta_reference.py); HF directories with `save_pretrained` (safetensors) or torch.save
(.bin in HF's layout). Every conversion must give HF's fp32 logits and greedy tokens.
"""

import copy
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import llama2_jax
from convert import hf_to_orbax, mapping, meta_to_orbax, orbax_io, orbax_to_hf, verify
from convert.common import ConversionError
from convert.sources import SourceError
from llama2_jax.model import checkpoint
from llama2_jax.model.checkpoint import CheckpointError
from llama2_jax.model.config import LLAMA2_70B, TINY, TINY_GQA
from llama2_jax.model.transformer import abstract_model
from llama2_jax.model.sharding import make_mesh
from tests import hf_reference as ref
from tests import meta_reference as meta
from tests.conftest import ROOT, TOKENIZER, xla_flags

CONFIGS = {
    "mha": TINY,
    "gqa": TINY_GQA,
    # For 8 shards (Meta splits attention by whole heads): one KV head per shard, as in 70B,
    "mha8": TINY.replace(n_heads=8, n_kv_heads=8),
    "gqa8": TINY.replace(n_heads=16, n_kv_heads=8),  # with 2 query heads to each (70B: 8)
}
TOKENS = [1, 17, 99, 3, 250, 42, 7, 128, 64, 5]


@pytest.fixture(scope="module")
def models():
    return {name: ref.hf_model(cfg, seed=i) for i, (name, cfg) in enumerate(CONFIGS.items())}


def check_matches_hf(output_dir, hf, cfg, mesh):
    """The converted checkpoint holds exactly HF's weights and gives its logits and tokens."""
    model = checkpoint.load(output_dir, mesh=mesh, dtype="float32")
    assert model.config.n_kv_heads == cfg.n_kv_heads and model.config.ffn_dim == cfg.ffn_dim
    want = ref.params_from_hf(hf, cfg)
    jax.tree.map(np.testing.assert_array_equal, checkpoint.params_of(model), want)
    np.testing.assert_allclose(llama2_jax.forward(model, TOKENS), ref.hf_logits(hf, [TOKENS])[0],
                               atol=1e-4, rtol=1e-4)
    prompt = TOKENS[:4]
    assert llama2_jax.generate(model, [prompt], max_new_tokens=6, temperature=0,
                               stop_ids=[]) == [ref.hf_greedy(hf, prompt, 6)]
    return model


def assert_nothing_written(output_dir):
    parent = os.path.dirname(os.path.abspath(output_dir))
    assert not os.path.exists(output_dir)
    assert not [n for n in os.listdir(parent) if ".tmp-" in n]


# -- Meta ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,n_shards", [("mha", 1), ("gqa", 1), ("mha", 2), ("gqa", 2),
                                           ("mha8", 8), ("gqa8", 8)])
def test_meta_shards_convert_to_hf_numerics(name, n_shards, models, tmp_path, one_device_mesh):
    cfg = CONFIGS[name]
    extra = {"rope.freqs": torch.ones(cfg.head_dim // 2)} if n_shards == 1 else None
    src = meta.write_meta(str(tmp_path / "meta"), models[name], cfg, n_shards, extra=extra)
    meta_to_orbax.convert(src, str(tmp_path / "out"), progress=False)
    check_matches_hf(str(tmp_path / "out"), models[name], cfg, one_device_mesh)


def test_meta_bf16_stays_bf16_and_loads_on_8_devices(models, tmp_path, one_device_mesh):
    cfg, hf = CONFIGS["gqa8"], models["gqa8"]
    src = meta.write_meta(str(tmp_path / "meta"), hf, cfg, 8, dtype=torch.bfloat16)
    out = str(tmp_path / "out")
    meta_to_orbax.convert(src, out, progress=False)
    assert checkpoint.read_config(out).param_dtype == "bfloat16"
    hf_bf16 = ref.hf_model(cfg, seed=2)  # HF on the bf16-rounded weights, computed in fp32
    hf_bf16.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in hf.state_dict().items()})
    one = check_matches_hf(out, hf_bf16, cfg, one_device_mesh)
    eight = checkpoint.load(out, mesh=make_mesh(tensor=8), dtype="float32")
    assert len(jax.tree.leaves(checkpoint.params_of(eight))[0].sharding.device_set) == 8
    np.testing.assert_allclose(llama2_jax.forward(eight, TOKENS), llama2_jax.forward(one, TOKENS),
                               atol=1e-5)


def test_layer_by_layer_writes_load_on_any_mesh(models, tmp_path, monkeypatch, one_device_mesh):
    """Tiny arrays stand in for 7B's: every stacked parameter streamed one layer at a time,
    chunks of a few KB, then restored onto 1 and 8 devices."""
    monkeypatch.setattr(orbax_io, "WHOLE_BYTES", 0)
    monkeypatch.setattr(orbax_io, "CHUNK_BYTES", 4096)
    cfg, hf = CONFIGS["mha8"], models["mha8"]
    src = meta.write_meta(str(tmp_path / "meta"), hf, cfg, 2)
    out = str(tmp_path / "out")
    meta_to_orbax.convert(src, out, progress=False)
    stores = orbax_io.open_params(os.path.join(out, checkpoint.PARAMS_DIR))
    for path, stacked in mapping.param_paths():
        chunk = mapping.get_path(stores, path).chunk_layout.read_chunk.shape
        assert np.prod(chunk) * 4 <= 4096 and (not stacked or chunk[0] == 1), (path, chunk)
    one = check_matches_hf(out, hf, cfg, one_device_mesh)
    for mesh in (make_mesh(tensor=8), make_mesh(fsdp=4, tensor=2)):
        model = checkpoint.load(out, mesh=mesh, dtype="float32")
        np.testing.assert_allclose(llama2_jax.forward(model, TOKENS),
                                   llama2_jax.forward(one, TOKENS), atol=1e-5)


def test_meta_vocab_from_tokenizer_beside_the_checkpoint(tmp_path, one_device_mesh):
    cfg = TINY.replace(vocab_size=32000)  # the test tokenizer's size
    hf = ref.hf_model(cfg, seed=5)
    shutil.copyfile(TOKENIZER, tmp_path / "tokenizer.model")  # Meta keeps it one level up
    src = meta.write_meta(str(tmp_path / "llama-2-tiny"), hf, cfg, 2, vocab_size=-1)
    out = str(tmp_path / "out")
    meta_to_orbax.convert(src, out, progress=False)
    assert checkpoint.read_config(out).vocab_size == 32000
    assert checkpoint.tokenizer_path(out)
    check_matches_hf(out, hf, cfg, one_device_mesh)
    os.remove(tmp_path / "tokenizer.model")
    with pytest.raises(SourceError, match="vocab_size is -1.*--tokenizer"):
        meta_to_orbax.convert(src, str(tmp_path / "out2"), progress=False)


def test_meta_verify_and_dtype_flag(models, tmp_path):
    src = meta.write_meta(str(tmp_path / "meta"), models["gqa"], TINY_GQA, 2,
                          dtype=torch.bfloat16)
    out = str(tmp_path / "out")
    diff = meta_to_orbax.convert(src, out, dtype="float32", verify_logits=True, progress=False)
    assert diff < 1e-4
    assert checkpoint.read_config(out).param_dtype == "float32"


def test_verify_fails_on_other_weights(models, tmp_path):
    src, out = str(tmp_path / "hf"), str(tmp_path / "out")
    models["gqa"].save_pretrained(src)
    hf_to_orbax.convert(src, out, progress=False)
    with pytest.raises(ConversionError, match="logits differ from transformers'"):
        verify.compare(out, lambda: ref.hf_model(TINY_GQA, seed=99))


@pytest.fixture(scope="module")
def good_meta(models, tmp_path_factory):
    """A valid 2-shard GQA Meta checkpoint with checklist.chk, copied by each bad-input test."""
    return meta.write_meta(str(tmp_path_factory.mktemp("good") / "meta"), models["gqa"],
                           TINY_GQA, 2)


def _shard(d, i=0):
    return os.path.join(d, f"consolidated.{i:02d}.pth")


def _edit_shard(d, edit, i=0):
    sd = torch.load(_shard(d, i), weights_only=True)
    edit(sd)
    torch.save(sd, _shard(d, i))


def _no_checklist(d):
    os.remove(os.path.join(d, "checklist.chk"))


def _truncate(path, keep=0.6):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


def _corrupt_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def _edit_params(d, **changes):
    path = os.path.join(d, "params.json")
    with open(path) as f:
        params = json.load(f)
    params.update(changes)
    with open(path, "w") as f:
        json.dump(params, f)


META_BAD = {
    "md5 mismatch": (lambda d: _corrupt_byte(_shard(d, 1)),
                     r"consolidated\.01\.pth: md5 [0-9a-f]+ does not match"),
    "missing shard in checklist": (lambda d: os.remove(_shard(d, 1)),
                                   r"checklist\.chk lists consolidated\.01\.pth, which is missing"),
    "missing last shard": (lambda d: (_no_checklist(d), os.remove(_shard(d, 1))),
                           r"consolidated\.00\.pth: tok_embeddings\.weight holds 32 of dim=64 "
                           r"columns, so the checkpoint was split into 2 shards, but 1 "
                           r"consolidated\.NN\.pth file\(s\) are present"),
    "gap in shards": (lambda d: (_no_checklist(d), os.rename(_shard(d, 1), _shard(d, 2))),
                      r"consolidated\.01\.pth missing"),
    "truncated shard": (lambda d: (_no_checklist(d), _truncate(_shard(d, 1))),
                        r"consolidated\.01\.pth: cannot read as a PyTorch checkpoint"),
    "unexpected tensor": (lambda d: (_no_checklist(d), _edit_shard(
        d, lambda sd: sd.update({"layers.0.attention.wz.weight": torch.zeros(2)}), 1)),
        r"consolidated\.01\.pth: unexpected tensor\(s\) layers\.0\.attention\.wz\.weight"),
    "missing tensor": (lambda d: (_no_checklist(d), _edit_shard(
        d, lambda sd: sd.pop("layers.1.ffn_norm.weight"))),
        r"consolidated\.00\.pth: missing tensor\(s\) layers\.1\.ffn_norm\.weight"),
    "shape contradicts params.json": (lambda d: (_no_checklist(d), _edit_params(d, n_kv_heads=4)),
                                      r"consolidated\.00\.pth: tensor layers\.0\.attention\.wk\."
                                      r"weight has shape \(16, 64\), expected \(32, 64\)"),
    "heads do not split over shards": (
        lambda d: (_no_checklist(d), _edit_params(d, n_kv_heads=1)),
        r"2 shards contradict params\.json: layers\.attention\.wk: n_kv_heads=1 does not "
        r"split into 2 model-parallel shards"),
}


@pytest.mark.parametrize("case", sorted(META_BAD))
def test_meta_bad_input_fails_before_any_output(case, good_meta, tmp_path):
    src = str(tmp_path / "meta")
    shutil.copytree(good_meta, src)
    damage, message = META_BAD[case]
    damage(src)
    out = str(tmp_path / "out")
    with pytest.raises(SourceError, match=message):
        meta_to_orbax.convert(src, out, progress=False)
    assert_nothing_written(out)


def test_meta_skip_checksum(good_meta, tmp_path):
    src = str(tmp_path / "meta")
    shutil.copytree(good_meta, src)
    with open(os.path.join(src, "checklist.chk"), "a") as f:
        f.write(f"{'0' * 32}  params.json\n")  # a wrong sum
    with pytest.raises(SourceError, match="md5"):
        meta_to_orbax.convert(src, str(tmp_path / "out"), progress=False)
    meta_to_orbax.convert(src, str(tmp_path / "out"), skip_checksum=True, progress=False)
    assert checkpoint.read_config(str(tmp_path / "out")).n_kv_heads == TINY_GQA.n_kv_heads


def test_existing_output_refused_unless_overwrite(good_meta, tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    with pytest.raises(ConversionError, match="already exists.*--overwrite"):
        meta_to_orbax.convert(good_meta, out, progress=False)
    assert os.listdir(out) == []
    meta_to_orbax.convert(good_meta, out, overwrite=True, progress=False)
    assert checkpoint.read_config(out).n_kv_heads == TINY_GQA.n_kv_heads


# -- Hugging Face --------------------------------------------------------------------------------

def save_bin_shards(model, directory, n_files=3):
    """HF's .bin layout, written with torch.save: pytorch_model-0000N-of-0000M.bin + index."""
    os.makedirs(directory)
    model.config.save_pretrained(directory)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = list(state)
    weight_map = {}
    for i in range(n_files):
        file = f"pytorch_model-{i + 1:05d}-of-{n_files:05d}.bin"
        part = {n: state[n] for n in names[i::n_files]}
        torch.save(part, os.path.join(directory, file))
        weight_map.update(dict.fromkeys(part, file))
    with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return directory


HF_LAYOUTS = {
    "safetensors shards": lambda m, d: m.save_pretrained(d, max_shard_size="100KB"),
    "single safetensors": lambda m, d: m.save_pretrained(d),
    "bin shards": save_bin_shards,
    "single bin": lambda m, d: (os.makedirs(d), m.config.save_pretrained(d), torch.save(
        m.state_dict(), os.path.join(d, "pytorch_model.bin"))),
}


@pytest.mark.parametrize("layout,name", [("safetensors shards", "gqa"), ("single safetensors",
                                          "mha"), ("bin shards", "gqa"), ("single bin", "mha8")])
def test_hf_converts_to_hf_numerics(layout, name, models, tmp_path, one_device_mesh):
    src = str(tmp_path / "hf")
    HF_LAYOUTS[layout](models[name], src)
    hf_to_orbax.convert(src, str(tmp_path / "out"), progress=False)
    check_matches_hf(str(tmp_path / "out"), models[name], CONFIGS[name], one_device_mesh)


def test_hf_tied_embeddings(tmp_path, one_device_mesh):
    hf = ref.hf_model(TINY_GQA, seed=7, tie=True)
    src = str(tmp_path / "hf")
    hf.save_pretrained(src)
    assert not any("lm_head" in k for f in glob.glob(f"{src}/*.safetensors") for k in load_file(f))
    hf_to_orbax.convert(src, str(tmp_path / "out"), progress=False)
    check_matches_hf(str(tmp_path / "out"), hf, TINY_GQA, one_device_mesh)


def _hf_tensors(directory):
    out = {}
    for f in glob.glob(os.path.join(directory, "*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_round_trip_is_exact(dtype, models, tmp_path):
    hf = copy.deepcopy(models["gqa"]).to(dtype)
    src, ckpt, back = (str(tmp_path / n) for n in ("hf", "ckpt", "back"))
    hf.save_pretrained(src, max_shard_size="100KB")
    shutil.copyfile(TOKENIZER, os.path.join(src, "tokenizer.model"))
    hf_to_orbax.convert(src, ckpt, progress=False)
    assert checkpoint.read_config(ckpt).param_dtype == str(dtype).split(".")[-1]
    diff = orbax_to_hf.export(ckpt, back, max_shard_size="120KB", verify_logits=True,
                              progress=False)
    assert diff < 1e-4
    original, exported = _hf_tensors(src), _hf_tensors(back)
    assert set(original) == set(exported)
    for name, t in original.items():
        assert exported[name].dtype == dtype
        assert torch.equal(exported[name], t), name
    assert len(glob.glob(os.path.join(back, "model-*-of-*.safetensors"))) > 1
    with open(os.path.join(back, "model.safetensors.index.json")) as f:
        assert set(json.load(f)["weight_map"]) == set(original)
    assert open(os.path.join(back, "tokenizer.model"), "rb").read() == \
        open(TOKENIZER, "rb").read()
    from transformers import AutoTokenizer, LlamaForCausalLM
    hf_tok, sp = AutoTokenizer.from_pretrained(back), llama2_jax.Tokenizer(TOKENIZER)
    for text in ("Hello world, this is Llama!", " leading space", "two  spaces\n\n  and",
                 "Über 🦙 llamas"):  # transformers' own conversion gets the middle two wrong
        assert hf_tok(text).input_ids == sp.encode(text, bos=True), text
        assert hf_tok.decode(hf_tok(text).input_ids, skip_special_tokens=True) == text
    exported_model, original_model = (LlamaForCausalLM.from_pretrained(d, dtype=torch.float32)
                                      .eval() for d in (back, src))
    np.testing.assert_array_equal(ref.hf_logits(exported_model, [TOKENS]),
                                  ref.hf_logits(original_model, [TOKENS]))


def test_export_of_a_saved_model_with_shard_chunks(tmp_path):
    """`llama2_jax.save` chunks each array by its shards, across layers; export reads that too."""
    cfg = CONFIGS["mha8"]
    model = checkpoint.random_model(cfg, mesh=make_mesh(tensor=8))
    checkpoint.save(str(tmp_path / "ckpt"), model)
    orbax_to_hf.export(str(tmp_path / "ckpt"), str(tmp_path / "hf"), progress=False)
    params = checkpoint.params_of(model)
    want = {}
    for path, layer, name in mapping.hf_names(cfg):
        w = np.asarray(mapping.get_path(params, path))
        want[name] = mapping.jax_to_hf(path, w if layer is None else w[layer], cfg)
    got = _hf_tensors(str(tmp_path / "hf"))
    assert set(got) == set(want)
    for name, w in want.items():
        np.testing.assert_array_equal(got[name].numpy(), w, err_msg=name)


@pytest.fixture(scope="module")
def good_hf(models, tmp_path_factory):
    src = str(tmp_path_factory.mktemp("good") / "hf")
    models["gqa"].save_pretrained(src, max_shard_size="100KB")
    return src


def _index(d):
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        return json.load(f)


def _set_index(d, index):
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)


def _edit_safetensors(d, tensor_name, edit):
    """Apply `edit(state)` to the file holding `tensor_name`, keeping the index in step."""
    from safetensors.torch import save_file
    index = _index(d)
    file = index["weight_map"][tensor_name]
    state = load_file(os.path.join(d, file))
    edit(state)
    save_file(state, os.path.join(d, file), metadata={"format": "pt"})
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != file}
    index["weight_map"].update(dict.fromkeys(state, file))
    _set_index(d, index)
    return file


def _edit_config(d, **changes):
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    config.update(changes)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)


def _first_file(d):
    return sorted(set(_index(d)["weight_map"].values()))[0]


HF_BAD = {
    "missing shard": (lambda d: os.remove(os.path.join(d, _first_file(d))),
                      r"model\.safetensors\.index\.json lists model-00001-of-\d+\.safetensors, "
                      r"which is missing"),
    "truncated shard": (lambda d: _truncate(os.path.join(d, _first_file(d))),
                        r"model-00001-of-\d+\.safetensors: cannot read as safetensors"),
    "unexpected tensor": (lambda d: _edit_safetensors(
        d, "model.norm.weight", lambda s: s.update({"model.extra.weight": torch.zeros(3)})),
        r"model-\d+-of-\d+\.safetensors: unexpected tensor\(s\) model\.extra\.weight"),
    "missing tensor": (lambda d: _edit_safetensors(
        d, "model.layers.1.mlp.up_proj.weight",
        lambda s: s.pop("model.layers.1.mlp.up_proj.weight")),
        r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"),
    "tensor not where the index says": (lambda d: _set_index(d, {**_index(d), "weight_map": {
        **_index(d)["weight_map"], "model.norm.weight": _first_file(d)}}),
        r"model-00001-of-\d+\.safetensors: missing tensor\(s\) model\.norm\.weight that the "
        r"index places in it"),
    "shape contradicts config.json": (lambda d: _edit_config(d, intermediate_size=256),
                                      r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape "
                                      r"\(128, 64\), expected \(256, 64\) from config\.json"),
    "no weights": (lambda d: [os.remove(f) for f in glob.glob(os.path.join(d, "model*"))],
                   r"no weights found"),
}


@pytest.mark.parametrize("case", sorted(HF_BAD))
def test_hf_bad_input_fails_before_any_output(case, good_hf, tmp_path):
    src = str(tmp_path / "hf")
    shutil.copytree(good_hf, src)
    damage, message = HF_BAD[case]
    damage(src)
    out = str(tmp_path / "out")
    with pytest.raises(SourceError, match=message):
        hf_to_orbax.convert(src, out, progress=False)
    assert_nothing_written(out)


# -- the command line, killed and rerun -----------------------------------------------------------

def test_cli_killed_midway_leaves_nothing_and_rerun_succeeds(tmp_path):
    """SIGKILL while the checkpoint is being written; the same command then succeeds."""
    cfg = TINY.replace(dim=512, n_layers=4, n_heads=8, n_kv_heads=8, ffn_dim=2048,
                       vocab_size=32000)  # 50M parameters: seconds to write
    hf = ref.hf_model(cfg, seed=3)
    src, out = str(tmp_path / "hf"), str(tmp_path / "out")
    hf.save_pretrained(src, max_shard_size="20MB")
    cmd = [sys.executable, "-m", "convert.hf_to_orbax", f"--input_dir={src}",
           f"--output_dir={out}", "--dtype=float32"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    staged, writing = [], False
    while not writing and proc.poll() is None and time.time() < deadline:
        staged = [n for n in os.listdir(tmp_path) if n.startswith(".out.tmp-")]
        writing = bool(staged) and any(n.startswith("params")
                                       for n in _listdir(tmp_path / staged[0]))
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)  # while orbax writes the parameters
    proc.wait()
    assert writing, "the conversion ended before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(out)
    with pytest.raises(CheckpointError):
        checkpoint.load(out)
    assert os.path.exists(tmp_path / staged[0])  # what the killed run left

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "converted hf checkpoint" in done.stdout
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # the stale one was removed
    model = checkpoint.load(out, mesh=make_mesh(devices=jax.devices()[:1]), dtype="float32")
    np.testing.assert_allclose(llama2_jax.forward(model, TOKENS), ref.hf_logits(hf, [TOKENS])[0],
                               atol=1e-4, rtol=1e-4)

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.returncode != 0 and "already exists" in again.stderr


def _listdir(path):
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


# -- tables --------------------------------------------------------------------------------------

def test_layout_tables_match_the_model_for_70b():
    cfg = LLAMA2_70B
    params = checkpoint.params_of(abstract_model(cfg))
    for path, stacked in mapping.param_paths():
        want = ((cfg.n_layers,) if stacked else ()) + mapping.jax_shape(path, cfg)
        assert mapping.get_path(params, path).shape == want, path
        assert mapping.meta_shard_shape(path, cfg, 8)  # 70B's 8 shards divide every split dim
