"""Shared fixtures. Eight simulated CPU devices, so multi-device code runs in the same process."""

import contextlib
import os
import sys

# Extra XLA flags for the suite and the apps it starts (`xla_flags`); none by default.
os.environ.setdefault("LLAMA2_JAX_TEST_XLA_FLAGS", "")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      + os.environ["LLAMA2_JAX_TEST_XLA_FLAGS"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # tests/test_aot.py: libtpu compiles
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `convert/` is not a package users install, but tests use it

# One persistent compilation cache for the session and the apps it starts (which inherit the
# environment): the tests build many engines of the same few shapes, and a step compiled once
# is read back instead of compiled again. (Memory measurements run without it:
# benchmarks/memory.py.)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".pytest_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The CPU kernels (llama2_jax.model.cpu_kernels) are built into the
# repository, not the user's home.
os.environ.setdefault("LLAMA2_JAX_KERNEL_DIR", os.path.join(ROOT, ".pytest_kernels"))

import jax  # noqa: E402
import pytest  # noqa: E402


def xla_flags(devices: int = 1) -> str:
    """XLA_FLAGS for an app a test starts with `devices` CPU devices."""
    count = f"--xla_force_host_platform_device_count={devices} " if devices > 1 else ""
    return count + os.environ.get("LLAMA2_JAX_TEST_XLA_FLAGS", "")


DATA = os.path.join(ROOT, "tests", "data")
TOKENIZER = os.path.join(DATA, "tokenizer.model")
GOLDEN = os.path.join(DATA, "llama2_chat_dialogs.jsonl")  # Meta chat_completion ids


@pytest.fixture(scope="session")
def one_device_mesh():
    from llama2_jax.model.sharding import make_mesh
    return make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="session")
def tokenizer():
    from llama2_jax import Tokenizer
    return Tokenizer(TOKENIZER)


def load_config_file(name: str, **overrides):
    """configs/<name>.py's config, with `overrides` as on the command line ("model.dim")."""
    from llama2_jax.cli import load_config_file as load
    config = load(os.path.join(ROOT, "configs", f"{name}.py"))
    config.update_from_flattened_dict(overrides)
    return config


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory):
    """A HOME whose ~/.cache/llama2_jax holds the chat demo's trained model, trained once per
    test run by configs/sft_demo.py (the run the demo makes on its first start); with
    pytest-xdist, once for all workers (a lock beside it)."""
    import fcntl
    import io

    from llama2_jax import finetune
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's directory, the same for every worker
    home = shared / "demo_home"
    run_dir = home / ".cache" / "llama2_jax" / "demo-v1"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(shared / "demo_home.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (run_dir / finetune.FINAL_DIR).is_dir():
            config = load_config_file("sft_demo", output_dir=str(run_dir), fsdp=1,
                                      progress=False)
            finetune.train(config, err=io.StringIO())
    return home


@pytest.fixture(scope="session")
def demo_checkpoint(demo_home):
    return str(demo_home / ".cache" / "llama2_jax" / "demo-v1" / "final")


def greedy_by_forward(engine, prompt, n):
    """The n greedy tokens after `prompt` by the cache-free forward pass, one token at a time:
    a reference independent of the KV cache, the slots and the sampler."""
    import numpy as np
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(engine.forward(seq)[-1])))
    return seq[len(prompt):]


def penalized_greedy(forward, prompt, n, s, eos=2):
    """Greedy tokens after `prompt` with the penalties of `s` (SamplingParams) applied, by
    `forward` (token ids -> logits [T, V]) and HF's logits processors (numpy for OpenAI's
    presence and frequency): independent of the slots, the cache and penalties.apply."""
    import numpy as np
    import torch
    from transformers.generation import logits_process as hf
    seq = list(prompt)
    for _ in range(n):
        x = torch.tensor(np.asarray(forward(seq)[-1:]))
        ids = torch.tensor([seq])
        if s.min_tokens:
            x = hf.MinNewTokensLengthLogitsProcessor(len(prompt), s.min_tokens, [eos])(ids, x)
        if s.logit_bias:
            x = hf.SequenceBiasLogitsProcessor([[[t], b] for t, b in s.logit_bias])(ids, x)
        if s.repetition_penalty != 1:
            x = hf.RepetitionPenaltyLogitsProcessor(s.repetition_penalty)(ids, x)
        counts = np.bincount(seq[len(prompt):], minlength=x.shape[-1])
        x = x.numpy()[0] - s.frequency_penalty * counts - s.presence_penalty * (counts > 0)
        seq.append(int(np.argmax(x)))
    return seq[len(prompt):]


def save_random(tmp_path_factory, mesh, name: str, cfg, seed: int):
    """A random model of `cfg` saved as checkpoint `name` with the real tokenizer."""
    from llama2_jax.model import checkpoint
    path = tmp_path_factory.mktemp(name) / name
    checkpoint.save(path, checkpoint.random_model(cfg, mesh, seed=seed), tokenizer_path=TOKENIZER)
    return path


@contextlib.contextmanager
def serving(path, name: str, **settings):
    """`python -m llama2_jax.serve` of the checkpoint at `path`, ready; it must exit cleanly."""
    from benchmarks.serving import ServerProcess
    s = ServerProcess(checkpoint_dir=path, train_config="", model_name=name, **settings)
    try:
        yield s.wait_ready()
    finally:
        assert s.terminate() == 0, s.output()


def random_adapter(cfg, targets=None, rank=4, alpha=8.0, seed=0, base_dir=None):
    """A LoRA Adapter for a model of `cfg` with non-zero a and b on every target (default: all),
    large enough to move the logits."""
    import numpy as np
    from convert import mapping
    from llama2_jax.model import adapter
    targets = tuple(adapter.TARGETS) if targets is None else targets
    rng = np.random.default_rng(seed)
    params = {}
    for t, (a_shape, b_shape) in adapter.shapes(cfg, targets, rank).items():
        mapping.set_path(params, ("layers", adapter.TARGETS[t][0], t), {
            "a": rng.normal(0, a_shape[1] ** -0.5, a_shape).astype(np.float32),
            "b": rng.normal(0, 0.05, b_shape).astype(np.float32)})
    return adapter.Adapter(params, rank, alpha, adapter.base_record(cfg, base_dir))
