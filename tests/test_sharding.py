"""8 simulated CPU devices must give the logits and tokens of 1."""

import jax
import numpy as np
import pytest

import llama2_jax
from llama2_jax.model import checkpoint, sharding
from llama2_jax.model.config import TINY
from llama2_jax.inference.generate import Engine
from llama2_jax.inference.params import GREEDY
from tests import hf_reference as ref

CFG = TINY.replace(n_heads=8, n_kv_heads=2)


@pytest.fixture(scope="module")
def params():
    return ref.params_from_hf(ref.hf_model(CFG, seed=5), CFG)


@pytest.fixture(scope="module")
def single(params, one_device_mesh):
    return checkpoint.from_params(CFG, params, one_device_mesh)


def test_eight_devices_present():
    assert len(jax.devices()) == 8, "conftest sets --xla_force_host_platform_device_count=8"


@pytest.mark.parametrize("data,fsdp,tensor", [(1, 2, 4), (2, 2, 2), (1, 1, 8), (1, 8, 1)])
def test_mesh_gives_single_device_results(params, single, data, fsdp, tensor):
    mesh = sharding.make_mesh(data=data, fsdp=fsdp, tensor=tensor)
    model = checkpoint.from_params(CFG, params, mesh)
    wq = checkpoint.params_of(model)["layers"]["attention"]["wq"]
    assert len(wq.sharding.device_set) == 8
    spec = wq.sharding.spec  # [L, D, N, H]: embed over fsdp, heads over tensor
    assert spec[1] == ("fsdp" if fsdp > 1 else None)
    assert spec[2] == ("tensor" if tensor > 1 else None)
    tokens = np.random.RandomState(0).randint(0, CFG.vocab_size, 23).tolist()
    np.testing.assert_allclose(llama2_jax.forward(model, tokens),
                               llama2_jax.forward(single, tokens), atol=2e-5, rtol=0)
    if (data, fsdp, tensor) != (1, 2, 4):
        return  # generation on the other meshes: the same steps (tests/test_doors.py: 8 devices)
    prompts = [tokens[:5], tokens[:19], tokens[:11], tokens]
    want = Engine(single).generate(prompts, max_new_tokens=6, params=GREEDY)
    for unstack in (True, False):
        got = Engine(model, unstack=unstack).generate(prompts, max_new_tokens=6,
                                                      params=GREEDY)
        assert got == want


def test_kv_heads_not_divisible_by_tensor_are_replicated(params):
    mesh = sharding.make_mesh(tensor=8)  # 8 query heads split, 2 KV heads replicated
    model = checkpoint.from_params(CFG, params, mesh)
    wk = checkpoint.params_of(model)["layers"]["attention"]["wk"]
    assert wk.sharding.spec[2] is None


def test_heads_not_divisible_by_tensor_is_an_error(params):
    with pytest.raises(sharding.ShardingError, match="n_heads=4"):
        checkpoint.from_params(TINY, ref.params_from_hf(ref.hf_model(TINY), TINY),
                               sharding.make_mesh(tensor=8))


def test_make_mesh_sizes_and_errors():
    assert dict(sharding.make_mesh(data=2, fsdp=-1, tensor=2).shape) == {
        "data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.make_mesh(fsdp=1, tensor=2).shape) == {"data": 1, "fsdp": 1,
                                                                 "tensor": 2}
    with pytest.raises(sharding.ShardingError, match="needs 16 devices"):
        sharding.make_mesh(data=2, fsdp=2, tensor=4)
    with pytest.raises(sharding.ShardingError, match="cannot be split"):
        sharding.make_mesh(data=3, fsdp=-1)
    with pytest.raises(sharding.ShardingError, match="at most one"):
        sharding.make_mesh(data=-1, fsdp=-1)
