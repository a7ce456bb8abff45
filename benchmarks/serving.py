"""A `python -m llama2_jax.serve` subprocess on a free port of 127.0.0.1, for the tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

START_TIMEOUT = 300  # seconds: JAX start-up, loading and compiling on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """The server started with `configs/<config>.py` and `overrides` ({"max_slots": 2}); with
    `processes` > 1, as that many JAX processes of `devices` devices each, joined by a
    coordinator on 127.0.0.1 (process 0 serves HTTP; `procs` and `output(i)` are per process)."""

    def __init__(self, config: str = "serve_demo", devices: int = 1, env=None,
                 processes: int = 1, **overrides):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [f"--config.port={self.port}", "--config.compilation_cache_dir="]
        args += [f"--config.{k}={v}" for k, v in overrides.items()]
        environ = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                       XLA_FLAGS=(f"--xla_force_host_platform_device_count={devices} "
                                  if devices > 1 else "")
                       # the test suite's (tests/conftest.py); benchmarks set none
                       + os.environ.get("LLAMA2_JAX_TEST_XLA_FLAGS", ""))
        environ.update(env or {})
        coordinator = f"127.0.0.1:{free_port()}"
        self.logs, self.procs = [], []
        for i in range(processes):
            flags = [] if processes == 1 else [
                "--config.multihost=true", f"--config.coordinator_address={coordinator}",
                f"--config.num_processes={processes}", f"--config.process_id={i}"]
            log = tempfile.NamedTemporaryFile("w+", suffix=f".{i}.log", delete=False)
            self.logs.append(log)
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "llama2_jax.serve", "--config", f"configs/{config}.py",
                 *args, *flags], cwd=ROOT, env=environ, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, text=True))
        self.log, self.proc = self.logs[0], self.procs[0]

    def wait_ready(self, timeout: float = START_TIMEOUT) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, p in enumerate(self.procs):
                if p.poll() is not None:
                    raise RuntimeError(f"server process {i} exited with {p.returncode}:\n"
                                       f"{self.output(i)}")
            try:
                status, _ = self.get("/health")
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.kill()
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.output()}")

    def output(self, process: int = 0) -> str:
        with open(self.logs[process].name) as f:
            return "".join(line for line in f if not line.startswith("[Gloo]"))

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 120):
        """(status, parsed JSON body or text)."""
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
                hdrs = dict(r.headers)
        except urllib.error.HTTPError as e:
            status, raw, hdrs = e.code, e.read(), dict(e.headers)
        self.last_headers = {k.lower(): v for k, v in hdrs.items()}
        text = raw.decode()
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, path: str, body, **kw):
        return self.request("POST", path, body, **kw)

    def metric(self, name: str, labels: str = "", default: float | None = None) -> float:
        """A value of GET /metrics, e.g. metric("llama2_jax_active_slots"); summed over
        label sets unless `labels` ('{reason="stop"}') picks one."""
        _, text = self.get("/metrics")
        total, found = 0.0, False
        for line in text.splitlines():
            if line.startswith(name + (labels if labels else "")) and (
                    line[len(name):len(name) + 1] in (" ", "{")):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        if not found:
            if default is not None:
                return default
            raise KeyError(f"{name}{labels} not in /metrics")
        return total

    def terminate(self, timeout: float = 60, process: int = 0) -> int:
        """SIGTERM to `process`; every process's exit within `timeout` seconds (else all are
        killed and TimeoutExpired raised). Returns process 0's exit status."""
        if self.procs[process].poll() is None:
            self.procs[process].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        try:
            for p in self.procs:
                p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return self.proc.returncode

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")
