"""The steps compiled ahead of time by XLA:TPU's own compiler (libtpu, no TPU), and by XLA:CPU:
every step the server, the chat and fine-tuning run compiles for a TPU topology, and no decode
step holds a second copy of the KV cache or reads more than its weights and cache."""

import json
import subprocess
import sys

import jax
import pytest

from llama2_jax import aot
from llama2_jax.model import config, sharding
from tests.conftest import ROOT

# head_dim 128 and 2 KV heads per device on 4 devices: the TPU's tiles as a real model has them
SMALL = config.TINY.replace(dim=1024, n_heads=8, n_kv_heads=8, ffn_dim=1024, n_layers=3,
                            max_seq_len=2048)


def tpu_devices(name: str) -> list:
    try:
        return aot.topology(name)
    except aot.AotError as e:
        pytest.skip(f"no XLA:TPU compiler here: {e}")


@pytest.mark.parametrize("name", ["v5e:2x2", "v4:2x2x1"])
def test_serve_steps_compile_for_tpu_without_a_second_cache(name):
    mesh = aot.mesh_on(tpu_devices(name), {"tensor": 4})
    cfg = SMALL.with_dtype("bfloat16")
    slots = aot.abstract_slots(cfg, mesh, slots=16, length=2048)
    assert not slots.weights.per_layer  # TPUs scan the stacked layers
    cache = aot.device_bytes(slots.cache)
    weights = aot.device_bytes(slots.weights.leaves)
    every_kind = name == "v5e:2x2"  # v4: the decode step only
    reports = {r.name.split(" ")[0]: r for r in aot.serve_steps(
        cfg, mesh, slots=16, length=2048, kinds=() if every_kind else ("decode",))}
    assert set(reports) == ({"prefill", "commit", "extract", "insert", "decode"} if every_kind
                            else {"decode"})
    decode = reports["decode"]
    assert decode.name == "decode 16 rows, attend 2048"
    # A cache carried through the layer scan cost a second copy of it (3x here, before).
    assert decode.temp_bytes <= 0.05 * cache, (decode.temp_bytes, cache)
    # HBM traffic: the weights and the cache read once (the other layers counted as one).
    assert decode.hbm_bytes <= 1.2 * (weights + cache), (decode.hbm_bytes, weights, cache)
    assert decode.hbm_bytes >= 0.9 * (weights + cache)
    assert decode.flops > 0 and decode.bytes_accessed > decode.hbm_bytes


def test_fine_tuning_steps_compile_for_tpu():
    mesh = aot.mesh_on(tpu_devices("v5e:2x2"), {"fsdp": 4})
    full = aot.train_step(SMALL, mesh, batch=4, seq_len=128)
    lora = aot.train_step(SMALL, mesh, batch=4, seq_len=128, lora_rank=8, quantization="int8")
    assert full.name.startswith("train full") and lora.name.startswith("train LoRA r8, int8")
    # the LoRA step holds an 8-bit frozen base and small adapters; full training fp32 weights
    # and two Adam moments
    assert lora.args_bytes < full.args_bytes / 4, (lora.args_bytes, full.args_bytes)


def test_plan_compile_prints_the_compilers_memory_beside_the_plan():
    tpu_devices("v5e:1x1")
    out = subprocess.run(
        [sys.executable, "-m", "llama2_jax.plan", "--model", "tiny", "--task", "serve",
         "--slots", "4", "--devices", "1 x tpu-v5e", "--compile", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    compiled = json.loads(out.stdout)["compiled"]
    assert compiled["topology"] == "v5e:1x1" and compiled["fits"]
    names = [s["name"] for s in compiled["steps"]]
    assert any(n.startswith("decode 4 rows") for n in names), names
    assert compiled["total_bytes"] >= compiled["resident_bytes"] > 0


def test_plan_compile_refuses_devices_it_has_no_compiler_for():
    out = subprocess.run(
        [sys.executable, "-m", "llama2_jax.plan", "--model", "tiny", "--devices", "2 x h100",
         "--compile"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--compile needs TPU devices" in out.stderr, out.stderr


@pytest.mark.parametrize("per_layer", [True, False], ids=["per-layer", "scanned"])
def test_cpu_decode_holds_no_second_cache(per_layer):
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    slots = aot.abstract_slots(SMALL, mesh, slots=16, length=2048, unstack=per_layer)
    cache = aot.device_bytes(slots.cache)
    [decode] = aot.serve_steps(SMALL, mesh, slots=16, length=2048, unstack=per_layer,
                               cost=False, kinds=("decode",))
    # XLA:CPU copies a scanned layer's slice of the cache before reading it: one layer's share
    # (3% of a 32-layer model's cache), never the whole cache.
    allowed = 0.05 * cache + (0 if per_layer else cache / SMALL.n_layers)
    assert decode.temp_bytes <= allowed, (decode.temp_bytes, cache)
