"""Several JAX processes on 127.0.0.1 (2 x 4 and 4 x 2 simulated CPU devices, gloo
collectives) run the chat app, fine-tuning and checkpoints exactly as one process with 8
devices; a killed process stops the others instead of hanging them; the usual multi-host
mistakes get errors that name them. Every run is bounded in time (tests/multihost.py)."""

import json
import os
import signal
import time

import numpy as np
import pytest

from tests import multihost
from benchmarks.serving import free_port

pytestmark = pytest.mark.multihost
TIMEOUT = 300


def chat_args(checkpoint_dir, *extra):
    return ["-m", "llama2_jax.chat", "--config", "configs/demo.py",
            f"--config.checkpoint_dir={checkpoint_dir}", "--config.train_config=",
            "--config.prompt=Count to five.", "--config.temperature=0",
            "--config.max_new_tokens=24", "--config.compilation_cache_dir=", *extra]


def sft_args(output_dir, *extra):
    return ["-m", "llama2_jax.finetune", "--config", "configs/sft_tiny.py",
            f"--config.output_dir={output_dir}", "--config.progress=false",
            "--config.compilation_cache_dir=", *extra]


def ok(result, what=""):
    assert result.returncode == 0, f"{what} exit {result.returncode}:\n{result.stderr[-3000:]}"
    return result


def losses(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def final_params(output_dir):
    import jax

    from llama2_jax.model import checkpoint
    model = checkpoint.load(os.path.join(output_dir, "final"))
    return jax.tree.map(np.asarray, checkpoint.params_of(model))


def assert_params_close(a, b, atol=1e-6):
    import jax
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b))
    assert max(diffs) <= atol, max(diffs)


def test_chat_one_shot_in_two_processes_answers_as_one(demo_checkpoint):
    """Process 0 reads the prompt and prints; process 1 prints nothing; the answer is the
    8-device single-process answer token for token."""
    one = ok(multihost.run_one(chat_args(demo_checkpoint), devices=8), "1 process")
    two = multihost.run(chat_args(demo_checkpoint), count=2, devices=4, timeout=TIMEOUT)
    ok(two[0], "process 0"), ok(two[1], "process 1")
    assert one.stdout.strip() and two[0].stdout == one.stdout
    assert two[1].stdout == "" and two[1].stderr.count("error") == 0
    assert "over 8 x cpu in 2 process(es)" in two[0].stderr


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    """sft_tiny with FSDP over 8 devices: in 1 process, and in 2 processes of 4 devices
    (orbax checkpoints written by both)."""
    tmp = tmp_path_factory.mktemp("multihost_sft")
    settings = ["--config.steps=6", "--config.save_every=3", "--config.eval_every=3",
                "--config.log_every=1"]
    one = ok(multihost.run_one(sft_args(tmp / "one", *settings), devices=8), "1 process")
    two = multihost.run(sft_args(tmp / "two", *settings), count=2, devices=4, timeout=TIMEOUT)
    ok(two[0], "process 0"), ok(two[1], "process 1")
    return tmp, one, two


def test_fsdp_fine_tuning_in_two_processes_equals_one(sft_runs):
    tmp, _, two = sft_runs
    a, b = losses(tmp / "one"), losses(tmp / "two")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6 * max(1.0, abs(a[step])), (step, a[step], b[step])
    assert_params_close(final_params(tmp / "one"), final_params(tmp / "two"))
    # both processes wrote the checkpoints; process 0 alone the metrics and run.json
    assert sorted(os.listdir(tmp / "two" / "checkpoints")) == ["3", "6"]
    assert "step 6" in two[0].stderr and "step 6" not in two[1].stderr


def test_a_checkpoint_from_two_processes_restores_in_one_and_in_four(sft_runs):
    """Loaded in this process on a (fsdp 4, tensor 2) mesh, and answered from by the chat app
    in 4 processes of 2 devices on another mesh: the same as one process."""
    import jax

    from llama2_jax.model import checkpoint, sharding
    tmp, _, _ = sft_runs
    final = str(tmp / "two" / "final")
    mesh = sharding.make_mesh(1, 4, 2)
    restored = checkpoint.load(final, mesh=mesh)
    assert_params_close(jax.tree.map(np.asarray, checkpoint.params_of(restored)),
                        final_params(tmp / "two"), atol=0)
    args = chat_args(final, "--config.tokenizer_path=", "--config.max_new_tokens=12")
    one = ok(multihost.run_one(args, devices=8), "1 process")
    four = multihost.run([*args, "--config.tensor=2", "--config.fsdp=-1"], count=4, devices=2,
                         timeout=TIMEOUT)
    for i, r in enumerate(four):
        ok(r, f"process {i}")
    assert four[0].stdout == one.stdout and all(r.stdout == "" for r in four[1:])


def test_a_killed_process_stops_the_other(tmp_path):
    """SIGKILL of process 1 in the middle of training: process 0 exits with an error within
    the heartbeat timeout (no hang) and no final checkpoint looks complete. (Resuming is
    tests/test_finetune.py's; checkpoints written by two processes restored elsewhere: above.)"""
    settings = ["--config.steps=500", "--config.save_every=1000", "--config.eval_every=1000",
                "--config.log_every=1", "--config.heartbeat_timeout_s=10"]
    out = tmp_path / "run"
    procs = multihost.Processes(sft_args(out, *settings), count=2, devices=4)
    deadline = time.monotonic() + TIMEOUT
    while not (out / "metrics.jsonl").is_file() or not losses(out):  # training has begun
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs.procs), \
            [p.communicate()[1][-2000:] for p in procs.procs]
        time.sleep(0.05)
    os.killpg(procs.procs[1].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        procs.procs[0].wait(timeout=120)
    except Exception:
        procs.kill()
        raise AssertionError("process 0 still running 120 s after process 1 was killed") \
            from None
    assert procs.procs[0].returncode != 0
    assert time.monotonic() - killed_at < 120
    assert not (out / "final").exists()


def test_mistakes_get_errors_that_name_them(tmp_path):
    # processes started with different settings: all stop, naming the setting
    runs = multihost.run(sft_args(tmp_path / "a"), count=2, devices=4, timeout=TIMEOUT,
                         extra=lambda i: [f"--config.seed={i}"])
    for r in runs:
        assert r.returncode == 1 and "different settings" in r.stderr and "seed" in r.stderr, \
            r.stderr[-2000:]
    assert not (tmp_path / "a").exists()
    # a coordinator nobody runs: the message names the address and the timeout
    port = free_port()
    lonely = multihost.run_one(sft_args(tmp_path / "b", "--config.multihost=true",
                                        f"--config.coordinator_address=127.0.0.1:{port}",
                                        "--config.num_processes=2", "--config.process_id=1",
                                        "--config.distributed_timeout_s=5"), devices=4,
                               timeout=120)
    assert lonely.returncode == 1
    assert f"coordinator at 127.0.0.1:{port} within 5 s" in lonely.stderr, lonely.stderr[-2000:]
    # a mesh that does not divide the 8 devices; a batch that does not divide over processes
    runs = multihost.run(sft_args(tmp_path / "c", "--config.data=3"), count=2, devices=4,
                         timeout=TIMEOUT)
    assert all(r.returncode == 1 and "8 devices" in r.stderr and "data=3" in r.stderr
               for r in runs), [r.stderr[-1000:] for r in runs]
    runs = multihost.run(sft_args(tmp_path / "d", "--config.batch_size=5",
                                  "--config.fsdp=1", "--config.data=1"),
                         count=2, devices=4, timeout=TIMEOUT)
    assert all(r.returncode == 1 and "does not divide over 2 processes" in r.stderr
               for r in runs), [r.stderr[-1000:] for r in runs]


# -- the server ------------------------------------------------------------------------------
SERVED = "llama2_jax-demo"  # configs/serve_demo.py's model_name
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def serve_settings(checkpoint_dir, **extra):
    return dict(checkpoint_dir=checkpoint_dir, train_config="", max_slots=4,
                context_length=256, prefill_chunk=64, heartbeat_timeout_s=10, **extra)


def answers(server, adapter: str = "") -> dict:
    """What the server answers to a fixed set of requests: greedy chat, a stream, a seeded
    sample, six concurrent requests of different lengths, and a chat again (its prompt from
    the prefix cache), through the `openai` client; with `adapter`, the chat by that LoRA
    adapter too."""
    import concurrent.futures

    import openai
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                           timeout=120)
    chat = [SYSTEM, {"role": "user", "content": "Count to five."}]

    def ask(messages, **kw):
        r = client.chat.completions.create(model=SERVED, messages=messages, temperature=0,
                                           max_tokens=24, **kw)
        cached = r.usage.prompt_tokens_details.cached_tokens
        return r.choices[0].message.content, r.usage.prompt_tokens, r.usage.completion_tokens, \
            cached

    def complete(i):
        return client.completions.create(model=SERVED, prompt=f"Question {i}: what is {i} "
                                          f"plus {i}?", temperature=0, max_tokens=8 + 2 * i
                                          ).choices[0].text

    out = {"chat": ask(chat)}
    stream = client.chat.completions.create(
        model=SERVED, messages=[SYSTEM, {"role": "user", "content": "Name a color."}],
        temperature=0, max_tokens=24, stream=True)
    out["stream"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    out["sampled"] = client.completions.create(model=SERVED, prompt="Once upon a time",
                                               temperature=0.8, top_p=0.9, seed=7,
                                               max_tokens=16).choices[0].text
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        out["concurrent"] = list(pool.map(complete, range(6)))
    out["chat again"] = ask(chat)
    if adapter:
        out["adapter"] = adapter_chat(server, adapter)
    return out


def adapter_chat(server, adapter: str) -> str:
    import openai
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                           timeout=120)
    return client.chat.completions.create(
        model=adapter, messages=[SYSTEM, {"role": "user", "content": "Count to five."}],
        temperature=0, max_tokens=24).choices[0].message.content


def test_server_in_two_processes_answers_as_one(demo_checkpoint, tmp_path):
    """Process 0 serves HTTP and process 1 follows its steps (2 x 4 devices, FSDP over all 8):
    every answer equals the one-process 8-device server's, a LoRA adapter's (listed at start,
    and loaded at run time) included; a client that leaves mid-stream frees its slot on both;
    SIGTERM to process 0 finishes the running stream, then both exit 0 with the same number
    of device calls made."""
    import httpx

    from benchmarks.serving import ServerProcess
    from llama2_jax.model import adapter, checkpoint
    from tests.conftest import random_adapter
    tuned = str(tmp_path / "tuned")
    adapter.save(tuned, random_adapter(checkpoint.read_config(demo_checkpoint), rank=4,
                                       alpha=32.0, base_dir=demo_checkpoint))
    settings = serve_settings(demo_checkpoint, adapters=f"tuned={tuned}", max_loras=2)
    # (compiling as requests come, not all at start: the answers are the same)
    one = ServerProcess(devices=8, warmup=False, **settings)
    try:
        expected = answers(one.wait_ready(), "tuned")
    finally:
        assert one.terminate() == 0, one.output()
    s = ServerProcess(devices=4, processes=2, warmup=False, **settings)
    try:
        s.wait_ready()
        assert "following process 0" in s.output(1)
        got = answers(s, "tuned")
        assert got == expected
        assert got["chat"][2] > 0 and len(set(got["concurrent"])) > 1
        assert got["chat again"][3] > 0  # its prompt came from the prefix cache
        assert got["adapter"] != got["chat"][0]
        status, body = s.post("/v1/load_lora_adapter", {"lora_name": "again",
                                                        "lora_path": tuned})
        assert status == 200, body
        assert adapter_chat(s, "again") == expected["adapter"]

        body = {"model": SERVED, "prompt": "Tell me a long story.", "max_tokens": 200,
                "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert any(next(lines).startswith("data: {") for _ in range(4))
        deadline = time.monotonic() + 30
        while s.metric("llama2_jax_active_slots") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.metric("llama2_jax_active_slots") == 0
        assert s.metric("llama2_jax_generations_finished_total", '{reason="cancelled"}',
                        default=0) == 1, s.get("/metrics")[1]
        again = answers(s)["chat"]  # (now its whole prompt is cached: compare the rest)
        assert again[:3] == expected["chat"][:3] and again[3] > 0

        body = dict(body, max_tokens=40)
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            first = next(lines)
            assert first.startswith("data: {")
            s.procs[0].send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: {")]
        final = json.loads(rest[-1][len("data: "):])
        assert final["choices"][0]["finish_reason"] == "length", rest[-1]
        assert [p.wait(60) for p in s.procs] == [0, 0], s.output(0) + s.output(1)
        leader, follower = s.output(0), s.output(1)
        assert "server stopped" in leader and "process 0 stopped the server" in follower
        assert "Traceback" not in leader + follower, leader + follower
    finally:
        s.kill()


def test_server_stops_when_any_process_is_told_to_or_dies(demo_checkpoint):
    """SIGTERM to process 1 drains the server (process 0 hears of it) and both exit 0; SIGKILL
    of process 1 ends process 0 with an error within the heartbeat timeout, not a hang."""
    from benchmarks.serving import ServerProcess
    body = {"model": SERVED, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    for how in ("SIGTERM", "SIGKILL"):
        s = ServerProcess(devices=4, processes=2, warmup=False,
                          **serve_settings(demo_checkpoint))
        try:
            s.wait_ready()
            assert s.post("/v1/completions", body)[0] == 200
            if how == "SIGTERM":
                assert s.terminate(timeout=90, process=1) == 0, s.output(0)
                assert s.procs[1].returncode == 0, s.output(1)
                assert "process 1: SIGTERM: no new requests" in s.output(0)
                continue
            s.procs[1].kill()
            killed = time.monotonic()
            try:
                s.procs[0].wait(120)
            except Exception:
                raise AssertionError("process 0 still running 120 s after process 1 was "
                                     f"killed:\n{s.output(0)}") from None
            assert s.procs[0].returncode != 0
            assert time.monotonic() - killed < 120
        finally:
            s.kill()
