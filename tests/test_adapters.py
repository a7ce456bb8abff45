"""LoRA adapters served per row (llama2_jax.inference.adapters): rows of different adapters and
of the base decode in one compiled step, each giving what its merged model gives by a
cache-free forward pass; loading an adapter compiles nothing; bad adapters are named.
Tiny random models; the server side is tests/test_serve_adapters.py."""

import jax
import numpy as np
import pytest

import llama2_jax
from llama2_jax.inference.adapters import Limits, limits_for
from llama2_jax.inference.params import GREEDY
from llama2_jax.inference.slots import Slots
from llama2_jax.inference.weights import Weights
from llama2_jax.model import adapter, checkpoint
from llama2_jax.model.adapter import AdapterError
from llama2_jax.model.config import TINY_GQA
from tests.conftest import random_adapter

CFG = TINY_GQA
PROMPTS = [[1, 17, 99, 3, 250, 42, 7], [1, 5, 6, 7, 8], [1, 200, 100, 50, 25, 12, 6, 3, 1],
           [1, 9, 9, 9]]
N = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_device_mesh):
    """(base model, {name: (adapter directory, merged model)})."""
    root = tmp_path_factory.mktemp("adapters")
    base = checkpoint.random_model(CFG, one_device_mesh, seed=4)
    made = {}
    for name, targets, rank, seed in (("all-r4", None, 4, 1), ("qv-r2", ("wq", "wv"), 2, 2),
                                      ("mlp-r8", ("w1", "w2", "w3", "wo"), 8, 3)):
        ad = random_adapter(CFG, targets, rank=rank, alpha=2.0 * rank, seed=seed)
        path = str(root / name)
        adapter.save(path, ad)
        made[name] = (path, adapter.merge(base, adapter.load(path, mesh=one_device_mesh)))
    return base, made


def greedy(model, prompt, n=N):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(llama2_jax.forward(model, seq)[-1])))
    return seq[len(prompt):]


def run_rows(slots, rows):
    """Prefill each (slot, prompt, adapter index) and decode them together, greedily: each
    slot's N tokens."""
    out = {}
    for slot, prompt, index in rows:
        slots.set_adapter(slot, index)
        for start in range(0, len(prompt), slots.chunk):
            chunk = prompt[start:start + slots.chunk]
            first = slots.prefill(slot, chunk, start, start + len(chunk) == len(prompt), GREEDY)
        out[slot] = [int(np.asarray(first.tokens)[0])]
    for _ in range(N - 1):
        step = np.asarray(slots.decode().tokens)
        for slot, _, _ in rows:
            out[slot].append(int(step[slot]))
    for slot, _, _ in rows:
        slots.release(slot)
    return out


@pytest.mark.parametrize("unstack", [True, False], ids=["per-layer", "scanned"])
def test_rows_of_different_adapters_in_one_step(setup, unstack):
    base, made = setup
    names = list(made)
    limits = limits_for([made[n][0] for n in names])
    assert limits == Limits(3, 8, tuple(adapter.TARGETS))
    slots = Slots(Weights(base, unstack=unstack), 4, 64, chunk=4, adapters=limits)
    compiled = slots.warm_up()
    for i, n in enumerate(names[:2]):
        slots.load_adapter(i + 1, made[n][0])
    # base, adapter 1, adapter 2 and adapter 1 again, side by side in one batch
    rows = [(0, PROMPTS[0], 0), (1, PROMPTS[1], 1), (2, PROMPTS[2], 2), (3, PROMPTS[3], 1)]
    got = run_rows(slots, rows)
    models = [base, made[names[0]][1], made[names[1]][1]]
    for slot, prompt, index in rows:
        assert got[slot] == greedy(models[index], prompt), (slot, index)
        if index:  # the adapter changes the answer: the check above can fail
            assert got[slot] != greedy(base, prompt)
    # A third adapter into index 3 and another over index 1: no compile, new answers.
    slots.load_adapter(3, made[names[2]][0])
    slots.load_adapter(1, made[names[2]][0])
    got = run_rows(slots, [(0, PROMPTS[0], 3), (1, PROMPTS[1], 1), (2, PROMPTS[2], 0)])
    assert got[0] == greedy(made[names[2]][1], PROMPTS[0])
    assert got[1] == greedy(made[names[2]][1], PROMPTS[1])
    assert got[2] == greedy(base, PROMPTS[2])
    assert slots.compile_count == compiled


def test_adapters_that_do_not_fit_are_named(setup, tmp_path, one_device_mesh):
    base, made = setup
    slots = Slots(Weights(base), 2, 32, adapters=Limits(2, 4, ("wq", "wv")))
    with pytest.raises(AdapterError, match="rank 8 is over the server's max_lora_rank 4"):
        slots.load_adapter(1, made["mlp-r8"][0])
    with pytest.raises(AdapterError, match=r"adapts wk, wo, w1, w2, w3, outside the server's "
                       r"lora_targets \(wq, wv\)"):
        slots.load_adapter(1, made["all-r4"][0])
    other = TINY_GQA.replace(dim=32)
    path = str(tmp_path / "other")
    adapter.save(path, random_adapter(other, ("wq",), rank=2))
    with pytest.raises(AdapterError, match="layers/attention/wq/a has shape"):
        slots.load_adapter(1, path)
    with pytest.raises(AdapterError, match="not a llama2_jax adapter"):
        slots.load_adapter(1, str(tmp_path))
    with pytest.raises(ValueError, match="adapter index 3 out of range 1..2"):
        slots.load_adapter(3, made["qv-r2"][0])
    with pytest.raises(ValueError, match="adapter index 5 out of range 0..2"):
        slots.set_adapter(0, 5)


def test_the_planner_counts_the_adapter_stack(setup):
    """The serve plan's "LoRA adapters" bytes are what the stack allocates, and a serve
    config's adapters reach the plan (settings.task_of)."""
    from llama2_jax import plan, settings
    from llama2_jax.serve.main import base_config
    base, made = setup
    limits = Limits(3, 8, ("wq", "wv", "w2"))
    stack = Slots(Weights(base), 2, 32, adapters=limits).adapters
    allocated = sum(x.nbytes for x in jax.tree.leaves(stack.arrays))
    task = plan.Task("serve", context=32, slots=2, max_loras=3, lora_rank=8,
                     lora_targets=limits.targets)
    bytes_ = plan.make_plan(CFG, task, plan.parse_devices("cpu"), quantization="none",
                            dtype="float32").per_device
    assert bytes_["LoRA adapters"] == allocated
    config = base_config()
    config.adapters = f"a={made['qv-r2'][0]},b={made['mlp-r8'][0]}"
    task = settings.task_of(config, "serve")
    assert (task.max_loras, task.lora_rank, task.lora_targets) == (
        2, 8, ("wq", "wv", "wo", "w1", "w2", "w3"))
    config.adapters = "a=x,a=y"
    with pytest.raises(settings.SettingsError, match="the name 'a' is used twice"):
        settings.adapter_list(config)
    config.adapters, config.max_loras = f"a={made['qv-r2'][0]},b={made['mlp-r8'][0]}", 1
    with pytest.raises(settings.SettingsError, match="lists 2 adapters, over max_loras=1"):
        settings.adapter_limits(config)
