"""Shared fixtures. Eight simulated CPU devices, so multi-device code runs in the same process."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `convert/` is not a package users install, but tests use it

import jax  # noqa: E402
import pytest  # noqa: E402

DATA = os.path.join(ROOT, "tests", "data")
TOKENIZER = os.path.join(DATA, "tokenizer.model")
GOLDEN = os.path.join(ROOT, "..", "shared", "golden", "llama2_chat_dialogs.jsonl")


@pytest.fixture(scope="session")
def one_device_mesh():
    from llama2_jax.sharding import make_mesh
    return make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="session")
def tokenizer():
    from llama2_jax import Tokenizer
    return Tokenizer(TOKENIZER)
