"""The server's life: the demo config answering the README's examples, a full queue, the API
key, health while loading, SIGTERM draining running requests, and bad settings at start."""

import concurrent.futures
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from llama2_jax.model import checkpoint
from llama2_jax.model.config import TINY
from tests.conftest import ROOT, TOKENIZER, xla_flags
from benchmarks.serving import ServerProcess

SYSTEM = "You are a helpful assistant."  # what the demo model was trained with


@pytest.fixture(scope="module")
def demo(demo_home):
    # (steps compiled as requests come: warm-up is tested with tests/test_batching.py)
    s = ServerProcess("serve_demo", env={"HOME": str(demo_home)}, warmup=False)
    try:
        yield s.wait_ready()
    finally:
        assert s.terminate() == 0, s.output()


def test_demo_answers_the_readme_curl_and_openai_examples(demo):
    body = ('{"model": "llama2_jax-demo", "temperature": 0, "messages": ['
            f'{{"role": "system", "content": "{SYSTEM}"}}, '
            '{"role": "user", "content": "Count to five."}]}')
    out = subprocess.run(["curl", "-sS", demo.url + "/v1/chat/completions", "-H",
                          "Content-Type: application/json", "-d", body],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert '"content":"1, 2, 3, 4, 5.' in out.stdout
    client = openai.OpenAI(base_url=demo.url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="llama2_jax-demo", temperature=0, stream=True,
        messages=[{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": "What is llama2_jax?"}])
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert "JAX" in text


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, one_device_mesh):
    path = tmp_path_factory.mktemp("lifecycle") / "tiny"
    cfg = TINY.replace(vocab_size=32000, max_seq_len=512)
    checkpoint.save(path, checkpoint.random_model(cfg, one_device_mesh, seed=1),
                    tokenizer_path=TOKENIZER)
    return path


def test_full_queue_api_key_and_sigterm_drain(tiny_dir):
    s = ServerProcess(checkpoint_dir=tiny_dir, train_config="", model_name="tiny",
                      max_slots=1, max_queue=1, context_length=512, warmup=False,
                      shutdown_grace_s=120, env={"LLAMA2_JAX_API_KEY": "s3cret"})
    try:
        s.wait_ready()
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0}
        assert s.post("/v1/completions", body)[0] == 401
        status, reply = s.post("/v1/completions", body, headers={"Authorization": "Bearer no"})
        assert status == 401 and reply["error"]["type"] == "authentication_error"
        assert s.get("/v1/models")[0] == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert s.post("/v1/completions", body, headers=auth)[0] == 200
        assert s.get("/health")[0] == 200 and s.get("/metrics")[0] == 200  # no key needed

        long = dict(body, max_tokens=400)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(s.post, "/v1/completions", long, headers=auth)
            wait_for(lambda: s.metric("llama2_jax_active_slots") == 1)
            queued = pool.submit(s.post, "/v1/completions", long, headers=auth)
            wait_for(lambda: s.metric("llama2_jax_queue_depth") == 1)
            status, reply = s.post("/v1/completions", body, headers=auth)
            assert status == 429 and reply["error"]["code"] == "queue_full"
            assert s.last_headers.get("retry-after") == "1"

            s.proc.send_signal(15)  # SIGTERM: the two accepted requests still finish
            wait_for(lambda: s.get("/health")[0] == 503)
            status, reply = s.post("/v1/completions", body, headers=auth)
            assert status == 503 and "shutting down" in reply["error"]["message"]
            for f in (running, queued):
                status, reply = f.result(timeout=300)
                assert status == 200 and reply["choices"][0]["finish_reason"] == "length"
                assert reply["usage"]["completion_tokens"] == 400
        assert s.proc.wait(60) == 0
        assert "server stopped" in s.output()
    finally:
        s.kill()


def test_health_is_503_while_loading_then_200(tiny_dir):
    s = ServerProcess(checkpoint_dir=tiny_dir, train_config="", model_name="tiny",
                      max_slots=1, context_length=128, warmup=True)
    try:
        seen, refused = set(), 0
        deadline = time.monotonic() + 300
        while 200 not in seen and time.monotonic() < deadline:
            try:
                status, body = s.get("/health")
                seen.add(status)
                if status == 503:
                    assert body["status"] == "loading"
                    r = httpx.post(s.url + "/v1/completions", json={
                        "model": "tiny", "prompt": [3], "max_tokens": 1}, timeout=30)
                    if r.status_code == 503:  # (it may have become ready in between)
                        assert "still loading" in r.json()["error"]["message"]
                        refused += 1
            except OSError:
                pass
            time.sleep(0.05)
        assert seen == {503, 200} and refused > 0
    finally:
        assert s.terminate() == 0, s.output()


@pytest.mark.parametrize("args,message", [
    (["--config.max_slots=0"], "max_slots=0 must be >= 1"),
    (["--config.checkpoint_dir=/nonexistent/llama"], "checkpoint directory not found"),
    (["--config.max_slot=2"], "did you mean max_slots"),
    (["--config.context_length=5000"], "context_length=5000 must be 0 (the model's) or in "
     "1..1024"),
])
def test_bad_settings_fail_at_start_with_one_line(args, message, demo_home):
    out = subprocess.run([sys.executable, "-m", "llama2_jax.serve", "--config",
                          "configs/serve_demo.py", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=120,
                         env=dict(os.environ, HOME=str(demo_home), XLA_FLAGS=xla_flags(),
                                  JAX_PLATFORMS="cpu"))
    assert out.returncode != 0 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def wait_for(condition, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)
