"""Peak anonymous memory of a child process (what the planner's CPU estimates are checked
against), sampled from /proc/<pid>/status, and the planner's estimate for the same run."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_anon(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/<pid>/status")


class PeakSampler:
    """Samples a process's RssAnon every `interval` seconds in a thread; `peak` is the
    largest seen (a context manager: sampling stops on exit)."""

    def __init__(self, pid: int, interval: float = 0.01):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_anon(self.pid))
            except (FileNotFoundError, ProcessLookupError, RuntimeError):
                return
            time.sleep(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def child_env(env: dict | None = None) -> dict:
    """One CPU device, unbuffered output, no persistent compilation cache (a step read from
    it skips the compiler's memory, which a first start pays)."""
    environ = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONUNBUFFERED="1")
    environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    environ.update(env or {})
    return environ


def peak_rss_anon(args: list[str], env: dict | None = None, timeout: float = 600,
                  interval: float = 0.01) -> tuple[int, subprocess.CompletedProcess]:
    """Run `python <args>` from the repository root; (peak RssAnon bytes, the result)."""
    child = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=child_env(env),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    with PeakSampler(child.pid, interval) as sampler:
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            raise TimeoutError(f"{args} ran over {timeout} s") from None
    return sampler.peak, subprocess.CompletedProcess(args, child.returncode, out, err)


def planned(config, app: str, model_cfg, quantization: str = "none"):
    """The planner's plan for `config` run by `app` (chat, serve, finetune) on one CPU device
    with room for anything: what its per-device total is compared with."""
    from llama2_jax.model import checkpoint
    from llama2_jax import plan, settings
    dtype = config.dtype or checkpoint.default_dtype()
    devices = plan.Devices(1, "cpu", 1 << 50, "cpu", "measurement")
    return plan.make_plan(model_cfg, settings.task_of(config, app), devices, dtype=dtype,
                          quantization=quantization, mesh={"data": 1, "fsdp": 1, "tensor": 1})
