"""The memory planner: full-size plans on named devices, refusals with numbers, the command
line, and its estimates against the memory a real process uses on this CPU."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from llama2_jax import devices as devices_module
from llama2_jax import plan, settings
from llama2_jax.model.config import LLAMA2_7B, LLAMA2_70B
from tests.conftest import ROOT, load_config_file, xla_flags

GB = 1e9


def test_70b_serves_on_a_v5e_8_in_int8_not_in_bfloat16():
    devices = plan.parse_devices("8 x tpu-v5e")
    assert devices.count == 8 and devices.bytes == 16 * devices_module.GiB
    assert devices.platform == "tpu"
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
    task = settings.task_of(config, "serve")
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
    p = plan.make_plan(LLAMA2_70B, settings.task_of(config, "serve"),
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
    with pytest.raises(plan.PlanError, match="needs LoRA"):
        plan.make_plan(LLAMA2_7B, plan.Task("sft"), plan.parse_devices("h100"),
                       quantization="int8")


def run_plan(*args):
    return subprocess.run([sys.executable, "-m", "llama2_jax.plan", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags()))


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


# -- `auto` in the apps -----------------------------------------------------------------------
def demo_chat_config(checkpoint_dir, **overrides):
    return load_config_file("demo", checkpoint_dir=checkpoint_dir, train_config="",
                            prompt="Count to five.", temperature=0.0, max_new_tokens=12,
                            compilation_cache_dir="", **overrides)


def chat_run(config):
    import io

    from llama2_jax import chat
    out, err = io.StringIO(), io.StringIO()
    status = chat.run(config, out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def test_auto_mesh_and_quantization_load_and_answer_as_the_explicit_ones(demo_checkpoint):
    """On the 8 simulated devices of the suite: the planner's mesh covers them all, keeps the
    weights unquantized (they fit), and the answer is the explicit settings' answer."""
    status, explicit, _ = chat_run(demo_chat_config(demo_checkpoint))
    assert status == 0
    status, out, err = chat_run(demo_chat_config(demo_checkpoint, mesh="auto",
                                                 quantization="auto"))
    assert status == 0, err
    line = next(s for s in err.splitlines() if s.startswith("plan: "))
    sizes = dict(kv.split("=") for kv in line[len("plan: mesh "):line.index(", quant")]
                 .split(", "))
    assert int(sizes["data"]) * int(sizes["fsdp"]) * int(sizes["tensor"]) == 8
    assert 4 % int(sizes["tensor"]) == 0  # the demo's 4 heads
    assert "quantization none" in line and "float32, weights none" in err
    assert out == explicit


def test_auto_quantizes_when_the_weights_do_not_fit(demo_checkpoint, monkeypatch):
    """Devices with room for the int8 weights but not the float32 ones: auto picks int8,
    which then loads and answers."""
    from llama2_jax.model import checkpoint
    cfg = checkpoint.read_config(demo_checkpoint)
    config = demo_chat_config(demo_checkpoint, mesh="auto", quantization="auto")
    task = settings.task_of(config, "chat")
    big = plan.Devices(8, "cpu", 1 << 40, "cpu", "test")
    full = plan.make_plan(cfg, task, big, quantization="none").total
    int8 = plan.make_plan(cfg, task, big, quantization="int8").total
    assert int8 < full
    room = int((full + int8) / 2 / (1 - plan.HEADROOM))
    monkeypatch.setattr(plan, "present_devices",
                        lambda: plan.Devices(8, "cpu", room, "cpu", "test"))
    status, out, err = chat_run(config)
    assert status == 0, err
    assert "quantization int8" in err and "weights int8" in err
    assert out.strip()
    # quantization fixed to none on the same devices: refused before loading, with numbers
    status, out, err = chat_run(demo_chat_config(demo_checkpoint, quantization="none"))
    assert status == 1 and out == ""
    assert "needs" in err and "quantization=int8 needs" in err and "loading" not in err


def test_settings_that_cannot_fit_fail_before_loading():
    """70B in float32 on this CPU: chat, serve and fine-tuning refuse in seconds (a random
    70B model is never made), naming the bytes needed and the closest fit."""
    import io

    from llama2_jax import finetune
    from llama2_jax.serve import main as serve_main
    from tests.conftest import TOKENIZER
    overrides = dict(checkpoint_dir="", train_config="", model_preset="70b",
                     tokenizer_path=TOKENIZER, quantization="none", prompt="Hi")
    status, out, err = chat_run(load_config_file("demo", **overrides))
    assert status == 1 and "error: " in err and "needs" in err and "GB" in err, err
    assert "quantization=int8 needs" in err
    del overrides["prompt"], overrides["train_config"]
    err = io.StringIO()
    assert serve_main.run(load_config_file("serve_demo", **overrides), err=err) == 1
    assert "needs" in err.getvalue() and "GB" in err.getvalue()
    err = io.StringIO()
    config = load_config_file("sft_tiny", checkpoint_dir="", model_preset="70b",
                              tokenizer_path=TOKENIZER, output_dir="/nonexistent/never-made")
    config.model = {}  # the preset's shape, not sft_tiny's
    assert finetune.run(config, err=err) == 1
    assert "needs" in err.getvalue() and "task=lora" in err.getvalue(), err.getvalue()
    assert not os.path.exists("/nonexistent/never-made")


# -- estimates against measurement ------------------------------------------------------------
def test_estimates_against_the_memory_of_real_runs(demo_home, demo_checkpoint, tmp_path):
    """The demo chat and a tiny SFT and LoRA run, each in a child process: the planner's
    total is within 15% of the measured peak RssAnon and never under it by more than 5%
    (benchmarks/bench_plan.py does the same for the 134M model, serving and 7B int8)."""
    from llama2_jax.model import checkpoint
    from llama2_jax.cli import random_config
    from benchmarks.memory import peak_rss_anon, planned
    ratios = {}
    demo = load_config_file("demo")
    peak, proc = peak_rss_anon(["-m", "llama2_jax.chat", "--config", "configs/demo.py",
                                "--config.prompt=Count to five.", "--config.temperature=0",
                                "--config.compilation_cache_dir="],
                               # the planner counts XLA's decode attention, not the CPU kernel's
                               env={"HOME": str(demo_home), "LLAMA2_JAX_CPU_KERNELS": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    ratios["demo chat"] = planned(demo, "chat",
                                  checkpoint.read_config(demo_checkpoint)).total / peak
    for name, extra in (("tiny SFT", []), ("tiny LoRA", ["--config.lora.rank=8"])):
        out = tmp_path / name.replace(" ", "_")
        args = ["-m", "llama2_jax.finetune", "--config", "configs/sft_tiny.py",
                f"--config.output_dir={out}", "--config.steps=4", "--config.save_every=2",
                "--config.eval_every=2", "--config.progress=false",
                "--config.compilation_cache_dir=", *extra]
        peak, proc = peak_rss_anon(args)
        assert proc.returncode == 0, proc.stderr[-2000:]
        config = load_config_file("sft_tiny", **({"lora.rank": 8} if extra else {}))
        ratios[name] = planned(config, "finetune", random_config(config)).total / peak
    for ratio in ratios.values():
        assert 0.95 <= ratio <= 1.15, ratios


def test_fits_table_cells_are_the_planners_own_verdicts():
    """`plan --table`: each cell's format fits and the less-quantized ones do not; a serve
    cell's slot count fits and one more does not."""
    devices = ("1 x t4", "1 x h100")
    table = plan.fits_table(models=("7b",), devices=devices).splitlines()
    assert table[0] == "| model | task | 1 x t4 | 1 x h100 |" and len(table) == 2 + 3
    cfg = LLAMA2_7B
    order = ["none", "int8", "int4"]
    for line, task in zip(table[2:], plan.TABLE_TASKS.values()):
        cells = [c.strip() for c in line.strip("|").split("|")][2:]
        for cell, d in zip(cells, devices):
            dev = plan.parse_devices(d)
            method = cell.split(",")[0]
            assert method in order, cell
            for less in order[:order.index(method)]:
                assert not plan.make_plan(cfg, task, dev, quantization=less).fits
            if task.name == "serve":
                n = int(cell.split(", ")[1].split()[0])
                at = [plan.make_plan(cfg, dataclasses.replace(task, slots=k), dev,
                                     quantization=method).fits for k in (n, n + 1)]
                assert at == [True, False]
            else:
                assert plan.make_plan(cfg, task, dev, quantization=method).fits
    assert "int4" in "".join(table)  # T4 serves 7B only in 4 bits
