"""Several JAX processes on 127.0.0.1, each with its share of simulated CPU devices, joined by
`jax.distributed` (a coordinator on a free local port, collectives over gloo): how the
multi-host tests run an app as a TPU pod or a GPU cluster would, bounded in time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT, xla_flags
from benchmarks.serving import free_port


class Processes:
    """`count` processes of `python <args> --config.multihost=true ...` with `devices` CPU
    devices each. `extra(i)` adds per-process arguments (a test of mismatched settings)."""

    def __init__(self, args: list[str], count: int, devices: int, *, env: dict | None = None,
                 extra=lambda i: [], port: int | None = None):
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        environ = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                       XLA_FLAGS=xla_flags(devices))
        environ.update(env or {})
        self.procs = []
        for i in range(count):
            flags = ["--config.multihost=true", f"--config.coordinator_address={self.address}",
                     f"--config.num_processes={count}", f"--config.process_id={i}"]
            self.procs.append(subprocess.Popen(
                [sys.executable, *args, *flags, *extra(i)], cwd=ROOT, env=environ,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, start_new_session=True))

    def wait(self, timeout: float = 300) -> list[subprocess.CompletedProcess]:
        """Every process's result; past `timeout` all are killed and TimeoutError says who
        was still running (a hang fails the test, not the suite)."""
        deadline = time.monotonic() + timeout
        results = []
        for i, p in enumerate(self.procs):
            try:
                out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                outputs = "\n".join(f"--- process {j}:\n{q.communicate()[1][-2000:]}"
                                    for j, q in enumerate(self.procs))
                raise TimeoutError(f"process {i} still running after {timeout} s (a hang)\n"
                                   f"{outputs}") from None
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        return results

    def kill(self, i: int | None = None) -> None:
        for j, p in enumerate(self.procs):
            if (i is None or i == j) and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


def run(args: list[str], count: int, devices: int, timeout: float = 300, **kw):
    return Processes(args, count, devices, **kw).wait(timeout)


def run_one(args: list[str], devices: int, timeout: float = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """The same command in one process with `devices` devices (what the others must equal)."""
    environ = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                   XLA_FLAGS=xla_flags(devices))
    environ.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=environ, timeout=timeout,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)
