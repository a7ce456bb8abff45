"""The memory planner: full-size plans on named devices, refusals with numbers, the command
line, and its estimates against the memory a real process uses on this CPU."""

import json
import os
import subprocess
import sys

import pytest

from llama2_jax import plan
from llama2_jax.config import LLAMA2_7B, LLAMA2_70B
from tests.conftest import ROOT, load_config_file

GB = 1e9


def test_70b_serves_on_a_v5e_8_in_int8_not_in_bfloat16():
    devices = plan.parse_devices("8 x tpu-v5e")
    assert devices.count == 8 and devices.bytes == 16 * plan.GiB and devices.platform == "tpu"
    task = plan.Task("serve", context=4096, slots=8)
    p = plan.make_plan(LLAMA2_70B, task, devices, model="70b")
    assert p.fits and p.quantization == "int8" and p.mesh == {"data": 1, "fsdp": 1, "tensor": 8}
    # int8 weights: ~69 GB over 8 devices; the KV cache split over the 8 KV heads
    assert 8.0 * GB < p.per_device["weights"] < 9.0 * GB
    per_position = 2 * 80 * 8 * 128 * 2  # k and v, 80 layers, 8 KV heads, bf16
    assert p.per_device["KV cache"] == (8 + 1) * 4096 * per_position // 8
    bf16 = plan.make_plan(LLAMA2_70B, task, devices, model="70b", quantization="none")
    assert not bf16.fits
    assert 17 * GB < bf16.per_device["weights"] < 17.5 * GB  # 138 GB / 8
    note = bf16.notes[0]
    assert "needs 1" in note and "8 x tpu-v5e have 137.4 GB" in note
    assert "quantization=int8 needs 69" in note


def test_the_serving_configs_fit_their_devices():
    """serve_7b_chat: under 10 GB of one accelerator; serve_70b_fp8: two H100s."""
    config = load_config_file("serve_7b_chat")
    task = plan.task_of(config, "serve")
    gpu = plan.Devices(1, "10 GB GPU", 10**10, "gpu", "test")
    p = plan.make_plan(LLAMA2_7B, task, gpu, quantization=config.quantization,
                       mesh={"data": 1, "fsdp": 1, "tensor": 1})
    assert p.fits and p.total < 9.5e9, p.table()
    n = LLAMA2_7B.num_params()
    embed = LLAMA2_7B.vocab_size * LLAMA2_7B.dim
    # 8-bit projections (output too) with a float32 scale per output channel; the token
    # embeddings and norms in bf16
    assert n + embed < p.per_device["weights"] < 1.01 * (n + embed)
    none = plan.make_plan(LLAMA2_7B, task, gpu, quantization="none")
    assert not none.fits and abs(none.per_device["weights"] - 2 * n) < 1e6
    config = load_config_file("serve_70b_fp8")
    mesh = {"data": config.data, "fsdp": config.fsdp, "tensor": config.tensor}
    p = plan.make_plan(LLAMA2_70B, plan.task_of(config, "serve"),
                       plan.parse_devices("2 x h100"), quantization="fp8", mesh=mesh)
    assert p.fits, p.table()


def test_lora_7b_on_one_24gb_gpu_and_full_sft_needs_more():
    devices = plan.parse_devices("1 x l4")
    lora = plan.make_plan(LLAMA2_7B, plan.Task("lora", batch=2, seq_len=1024), devices,
                          quantization="int8")
    assert lora.fits, lora.table()
    sft = plan.make_plan(LLAMA2_7B, plan.Task("sft", batch=2, seq_len=1024), devices)
    assert not sft.fits
    assert sft.per_device["master weights"] == pytest.approx(4 * LLAMA2_7B.num_params(),
                                                             rel=1e-6)
    assert sft.per_device["AdamW moments"] == pytest.approx(8 * LLAMA2_7B.num_params(),
                                                            rel=1e-6)
    assert "task=lora" in sft.notes[0]


def test_bad_devices_and_tasks_are_refused_by_name():
    with pytest.raises(plan.PlanError, match="unknown device kind 'tpu-v9'"):
        plan.parse_devices("8 x tpu-v9")
    with pytest.raises(plan.PlanError, match="expected '<count> x <kind>'"):
        plan.parse_devices("eight tpus")
    with pytest.raises(plan.PlanError, match="task 'train'"):
        plan.make_plan(LLAMA2_7B, plan.Task("train"), plan.parse_devices("h100"))
    with pytest.raises(plan.PlanError, match="quantization must be none"):
        plan.make_plan(LLAMA2_7B, plan.Task("sft"), plan.parse_devices("h100"),
                       quantization="int8")


def run_plan(*args):
    return subprocess.run([sys.executable, "-m", "llama2_jax.plan", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))


def test_command_line_table_json_and_exit_status():
    out = run_plan("--model", "70b", "--devices=8 x tpu-v5e", "--task=serve")
    assert out.returncode == 0, out.stderr
    assert "mesh data=1, fsdp=1, tensor=8" in out.stdout and "quantization int8" in out.stdout
    assert "fits" in out.stdout
    out = run_plan("--model", "70b", "--devices=2 x h100", "--quantization=none", "--json")
    assert out.returncode == 1
    p = json.loads(out.stdout)
    assert p["fits"] is False and p["quantization"] == "none"
    assert p["per_device_bytes"]["total"] == sum(v for k, v in p["per_device_bytes"].items()
                                                 if k != "total")
    assert "needs" in p["notes"][0]
    out = run_plan("--model", "7b", "--devices=4 x tpu-v9")
    assert out.returncode == 2 and "unknown device kind" in out.stderr
