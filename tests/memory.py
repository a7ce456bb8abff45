"""Peak anonymous memory of a child process (what the planner's CPU estimates are checked
against), sampled from /proc/<pid>/status."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.conftest import ROOT


def rss_anon(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/<pid>/status")


def peak_rss_anon(args: list[str], env: dict | None = None, timeout: float = 600,
                  interval: float = 0.01) -> tuple[int, subprocess.CompletedProcess]:
    """Run `python <args>` from the repository root; (peak RssAnon bytes, the result)."""
    environ = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONUNBUFFERED="1")
    environ.update(env or {})
    child = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=environ,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    peak, deadline = 0, time.monotonic() + timeout
    try:
        while child.poll() is None:
            if time.monotonic() > deadline:
                child.kill()
                raise TimeoutError(f"{args} ran over {timeout} s")
            try:
                peak = max(peak, rss_anon(child.pid))
            except (FileNotFoundError, ProcessLookupError, RuntimeError):
                pass
            time.sleep(interval)
    finally:
        out, err = child.communicate()
    return peak, subprocess.CompletedProcess(args, child.returncode, out, err)
