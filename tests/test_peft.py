"""LoRA adapters on their own (llama2_jax.model.adapter) and Hugging Face PEFT's format:
exported adapters give PEFT's logits on the base exported by convert/orbax_to_hf.py, imports
round-trip exactly, and bad inputs fail naming what is wrong. Tiny random models only."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import llama2_jax
from convert import adapter_to_peft, mapping, orbax_to_hf, peft_to_adapter
from convert.common import ConversionError
from convert.sources import SourceError
from llama2_jax.model import adapter, checkpoint
from llama2_jax.model.config import TINY_GQA
from tests import hf_reference as ref
from tests.conftest import ROOT, random_adapter, xla_flags

CFG = TINY_GQA  # 4 query heads, 2 KV heads: q and k permuted over different head counts
TOKENS = [1, 17, 99, 3, 250, 42, 7, 128, 64, 5]
ALL = tuple(adapter.TARGETS)
HF_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, one_device_mesh):
    """(llama2_jax base checkpoint, its export by convert/orbax_to_hf.py)."""
    root = tmp_path_factory.mktemp("base")
    model = checkpoint.from_params(CFG, ref.params_from_hf(ref.hf_model(CFG, seed=3), CFG),
                                   one_device_mesh)
    ckpt, hf_dir = str(root / "ckpt"), str(root / "hf")
    checkpoint.save(ckpt, model)
    orbax_to_hf.export(ckpt, hf_dir, progress=False)
    return ckpt, hf_dir


def hf_base(hf_dir):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def peft_logits(hf_dir, peft_dir):
    from peft import PeftModel
    model = PeftModel.from_pretrained(hf_base(hf_dir), peft_dir).eval()
    return ref.hf_logits(model, [TOKENS])[0]


def merged_logits(ckpt, ad, mesh):
    model = checkpoint.load(ckpt, mesh=mesh, dtype="float32")
    return np.asarray(llama2_jax.forward(adapter.merge(model, ad), TOKENS))


def tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


# -- the export gives PEFT's logits ---------------------------------------------------------------
def test_export_on_the_exported_base_gives_the_merged_models_logits(base, tmp_path,
                                                                    one_device_mesh,
                                                                    monkeypatch):
    ckpt, hf_dir = base
    ad_dir, peft_dir = str(tmp_path / "adapter"), str(tmp_path / "peft")
    adapter.save(ad_dir, random_adapter(CFG, base_dir=ckpt))
    ad = adapter.load(ad_dir, mesh=one_device_mesh)
    assert ad.targets == ALL and ad.scale == 2.0
    adapter_to_peft.export(ad_dir, peft_dir, base_model_name_or_path=hf_dir)
    with open(os.path.join(peft_dir, "adapter_config.json")) as f:
        config = json.load(f)
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == \
        ("LORA", "CAUSAL_LM", 4, 8.0)
    assert sorted(config["target_modules"]) == sorted(HF_MODULES)
    assert config["base_model_name_or_path"] == hf_dir
    tensors = load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == \
        (CFG.n_kv_heads * CFG.head_dim, 4)
    assert tensors["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"].shape == \
        (4, CFG.n_heads * CFG.head_dim)

    ours = merged_logits(ckpt, ad, one_device_mesh)
    np.testing.assert_allclose(peft_logits(hf_dir, peft_dir), ours, atol=1e-4, rtol=1e-4)
    base_logits = ref.hf_logits(hf_base(hf_dir), [TOKENS])[0]
    assert np.abs(base_logits - ours).max() > 0.1  # the adapter moves the logits

    # The check can fail: B of wq and wk left in Meta's RoPE order gives other logits.
    monkeypatch.setattr(mapping, "hf_permute", lambda w, heads: w)
    adapter_to_peft.export(ad_dir, str(tmp_path / "unpermuted"))
    assert np.abs(peft_logits(hf_dir, str(tmp_path / "unpermuted")) - ours).max() > 1e-3


# -- PEFT -> llama2_jax -> PEFT ------------------------------------------------------------------
def peft_adapter(hf_dir, out, *, modules=HF_MODULES, rank=4, alpha=16, dtype=torch.float32,
                 seed=0):
    """An adapter saved by PEFT itself, its A and B random (PEFT starts B at zero)."""
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(hf_base(hf_dir), LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(modules), task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn_like(p))
    model.to(dtype).save_pretrained(out)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_import_round_trips_exactly(base, tmp_path, one_device_mesh, dtype):
    ckpt, hf_dir = base
    src, ad_dir, back = (str(tmp_path / n) for n in ("src", "adapter", "back"))
    peft_adapter(hf_dir, src, dtype=dtype)
    peft_to_adapter.convert(src, ckpt, ad_dir)
    ad = adapter.load(ad_dir, mesh=one_device_mesh)
    assert (ad.rank, ad.alpha, ad.targets) == (4, 16, ALL)
    assert ad.base["checkpoint_dir"] == os.path.abspath(ckpt)
    assert {x.dtype for x in jax.tree.leaves(ad.params)} == {np.dtype(str(dtype)[6:])}
    adapter_to_peft.export(ad_dir, back)
    original, exported = (load_file(os.path.join(d, "adapter_model.safetensors"))
                          for d in (src, back))
    assert set(original) == set(exported)
    for name, t in original.items():
        assert exported[name].dtype == dtype and torch.equal(exported[name], t), name
    configs = []
    for d in (src, back):
        with open(os.path.join(d, "adapter_config.json")) as f:
            configs.append(json.load(f))
    for key in ("peft_type", "task_type", "r", "lora_alpha", "base_model_name_or_path"):
        assert configs[0][key] == configs[1][key], key
    assert sorted(configs[0]["target_modules"]) == sorted(configs[1]["target_modules"])
    if dtype == torch.float32:  # the import's numerics, against PEFT's own adapter
        np.testing.assert_allclose(merged_logits(ckpt, ad, one_device_mesh),
                                   peft_logits(hf_dir, src), atol=1e-4, rtol=1e-4)


def test_llama2_jax_adapter_round_trips_through_peft_exactly(base, tmp_path, one_device_mesh):
    ckpt, _ = base
    first, peft_dir, second = (str(tmp_path / n) for n in ("first", "peft", "second"))
    adapter.save(first, random_adapter(CFG, targets=("wq", "wk", "wo", "w2"), base_dir=ckpt))
    adapter_to_peft.export(first, peft_dir)
    peft_to_adapter.convert(peft_dir, ckpt, second)
    a, b = (adapter.load(d, mesh=one_device_mesh) for d in (first, second))
    assert (b.rank, b.alpha, b.targets) == (a.rank, a.alpha, ("wq", "wk", "wo", "w2"))
    tree_equal(a.params, b.params)


# -- bad inputs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_peft(base, tmp_path_factory):
    return peft_adapter(base[1], str(tmp_path_factory.mktemp("good") / "peft"),
                        modules=("q_proj", "v_proj", "down_proj"))


def _edit_config(d, **changes):
    path = os.path.join(d, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def _edit_tensors(d, edit):
    path = os.path.join(d, "adapter_model.safetensors")
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


V_B1 = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
DOWN_A0 = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
PEFT_BAD = {
    "unknown target module": (lambda d: _edit_config(
        d, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]),
        r"adapter_config\.json: target_modules names lm_head, which llama2_jax cannot adapt"),
    "regex target modules": (lambda d: _edit_config(d, target_modules=".*proj"),
                             r"target_modules='\.\*proj' is a regular expression"),
    "missing tensor": (lambda d: _edit_tensors(d, lambda s: s.pop(V_B1)),
                       rf"adapter_model\.safetensors: missing tensor\(s\) {V_B1}"),
    "unexpected tensor": (lambda d: _edit_tensors(d, lambda s: s.update(
        {V_B1.replace("lora_B.weight", "lora_magnitude_vector"): torch.ones(32)})),
        r"adapter_model\.safetensors: unexpected tensor\(s\) base_model\.model\.model\.layers"
        r"\.1\.self_attn\.v_proj\.lora_magnitude_vector"),
    "shape from another model": (lambda d: _edit_tensors(d, lambda s: s.update(
        {DOWN_A0: torch.zeros(4, 100)})),
        rf"tensor {DOWN_A0} has shape \(4, 100\), expected \(4, 128\) \(r=4 in "
        r"adapter_config\.json, the base model in "),
    "rank contradicts the config": (lambda d: _edit_config(d, r=8),
                                    r"lora_A\.weight has shape \(4, 64\), expected \(8, 64\) "
                                    r"\(r=8 in adapter_config\.json"),
    "DoRA": (lambda d: _edit_config(d, use_dora=True), r"use_dora=True is not supported"),
    "not LoRA": (lambda d: _edit_config(d, peft_type="IA3"), r"peft_type 'IA3'"),
    "no config": (lambda d: os.remove(os.path.join(d, "adapter_config.json")),
                  r"no adapter_config\.json"),
    "no weights": (lambda d: os.remove(os.path.join(d, "adapter_model.safetensors")),
                   r"no adapter_model\.safetensors"),
}


@pytest.mark.parametrize("case", sorted(PEFT_BAD))
def test_peft_bad_input_fails_naming_it_before_any_output(case, good_peft, base, tmp_path):
    src, out = str(tmp_path / "peft"), str(tmp_path / "out")
    shutil.copytree(good_peft, src)
    damage, message = PEFT_BAD[case]
    damage(src)
    with pytest.raises(SourceError, match=message):
        peft_to_adapter.convert(src, base[0], out)
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_an_adapter_of_another_base_is_refused_naming_the_tensor(good_peft, tmp_path,
                                                                 one_device_mesh):
    other = str(tmp_path / "mha")  # 4 KV heads: k and v have twice the rows of the GQA base
    checkpoint.save(other, checkpoint.random_model(CFG.replace(n_kv_heads=4), one_device_mesh))
    with pytest.raises(SourceError, match=r"tensor base_model\.model\.model\.layers\.0\.self_attn"
                       r"\.v_proj\.lora_B\.weight has shape \(32, 4\), expected \(64, 4\)"):
        peft_to_adapter.convert(good_peft, other, str(tmp_path / "out"))
    ad = random_adapter(CFG, targets=("wk",))
    with pytest.raises(adapter.AdapterError, match=r"layers/attention/wk/b has shape \(2, 4, 32\)"
                       r", a rank-4 adapter of the model .* needs \(2, 4, 64\)"):
        adapter.merge(checkpoint.load(other, mesh=one_device_mesh), ad)


def test_adapter_directories_are_whole_or_refused(base, tmp_path, monkeypatch, one_device_mesh):
    ckpt, _ = base
    ad_dir = str(tmp_path / "adapter")

    def killed(src, dst):
        raise KeyboardInterrupt  # stands for a kill between the write and the rename
    monkeypatch.setattr(checkpoint, "replace_dir", killed)
    with pytest.raises(KeyboardInterrupt):
        adapter.save(ad_dir, random_adapter(CFG, base_dir=ckpt))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []
    os.makedirs(os.path.join(ad_dir, "params"))  # what a kill mid-write would leave, renamed
    with pytest.raises(adapter.AdapterError, match="no llama2_jax_adapter.json.*incomplete"):
        adapter.load(ad_dir)
    shutil.rmtree(ad_dir)
    adapter.save(ad_dir, random_adapter(CFG, base_dir=ckpt))
    with pytest.raises(checkpoint.CheckpointError, match="already exists"):
        adapter.save(ad_dir, random_adapter(CFG, base_dir=ckpt))
    with pytest.raises(checkpoint.CheckpointError, match="is a LoRA adapter, not a model"):
        checkpoint.load(ad_dir)
    meta_path = os.path.join(ad_dir, "llama2_jax_adapter.json")
    with open(meta_path) as f:
        meta = json.load(f)
    with open(meta_path, "w") as f:
        json.dump({**meta, "rank": 8, "scale": 1.0}, f)
    with pytest.raises(adapter.AdapterError, match=r"tensor layers/attention/wq/a has shape "
                       r"\(2, 64, 4\), its base model and rank give \(2, 64, 8\)"):
        adapter.load(ad_dir)
    with open(meta_path, "w") as f:
        json.dump({**meta, "targets": ["wq"]}, f)
    with pytest.raises(adapter.AdapterError, match=r"tensor layers/attention/wk/a unexpected in"):
        adapter.load(ad_dir)
    with pytest.raises(adapter.AdapterError, match="is a model checkpoint, not a LoRA adapter"):
        adapter.load(ckpt)
    with pytest.raises(ConversionError, match="already exists; pass --overwrite"):
        adapter_to_peft.export(ad_dir, ckpt)


def test_cli_export_and_import(base, tmp_path):
    ckpt, _ = base
    ad_dir, peft_dir, back = (str(tmp_path / n) for n in ("adapter", "peft", "back"))
    adapter.save(ad_dir, random_adapter(CFG, targets=("wq", "w3"), base_dir=ckpt))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
    export = [sys.executable, "-m", "convert.adapter_to_peft", f"--adapter_dir={ad_dir}",
              f"--output_dir={peft_dir}", "--base_model_name_or_path=meta-llama/Llama-2-7b-hf"]
    done = subprocess.run(export, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "exported a rank-4 LoRA adapter on wq, w3 to PEFT" in done.stdout
    again = subprocess.run(export, cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.returncode != 0 and "already exists; pass --overwrite" in again.stderr
    done = subprocess.run([sys.executable, "-m", "convert.peft_to_adapter",
                           f"--input_dir={peft_dir}", f"--base_dir={ckpt}",
                           f"--output_dir={back}"], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert adapter.read_meta(back)["base"]["name"] == "meta-llama/Llama-2-7b-hf"
