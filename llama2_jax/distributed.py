"""Several JAX processes, one per host (TPU pods, multi-node GPU clusters): start-up, the
checks that turn the usual multi-host mistakes into errors instead of hangs, and exits.

Settings (every app's config, see `fields`):
  multihost            call `jax.distributed.initialize()`
  coordinator_address  "host:port" of process 0's coordinator; "" = JAX's own detection
                       (TPU VMs, SLURM, Open MPI, the JAX_COORDINATOR_ADDRESS environment)
  num_processes        with coordinator_address: how many processes in all
  process_id           with coordinator_address: this process's index, 0..num_processes-1
  distributed_timeout_s  how long to wait for the other processes to connect
  heartbeat_timeout_s    how long a silent process may go before the others stop with an
                       error (a killed host must not hang the rest)

On CPU the processes' collectives go over gloo (tests run several processes on 127.0.0.1).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from typing import Callable

import jax
import ml_collections

from llama2_jax.model.sharding import ShardingError

# Settings that differ between processes by design, and those a rerun may change.
PER_PROCESS = {"process_id"}


class DistributedError(ShardingError):
    """Processes that cannot work together; the message says which and why."""


def fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Add the multi-process settings to an app's config `c`; returns `c`."""
    c.multihost = False  # jax.distributed.initialize(); process 0 reads input and prints
    c.coordinator_address = ""  # "host:port"; "" = detected (TPU VMs, SLURM, ...)
    c.num_processes = 0  # with coordinator_address
    c.process_id = -1  # with coordinator_address
    c.distributed_timeout_s = 300
    c.heartbeat_timeout_s = 60
    return c


def initialize(config: ml_collections.ConfigDict) -> None:
    """Join the other processes when `config.multihost`; then check that every process runs
    the same settings. Raises DistributedError (a coordinator that cannot be reached, bad
    process settings, processes with different configs)."""
    if not config.get("multihost", False):
        return
    address = config.get("coordinator_address", "")
    kwargs = {}
    if address:
        n, pid = int(config.num_processes), int(config.process_id)
        if n < 1 or not 0 <= pid < n:
            raise DistributedError(
                f"coordinator_address={address!r} needs num_processes >= 1 and process_id in "
                f"0..num_processes-1, got num_processes={n}, process_id={pid}")
        kwargs = dict(coordinator_address=address, num_processes=n, process_id=pid)
    timeout = int(config.get("distributed_timeout_s", 300))
    _stdout_for_python_only()
    if address and int(config.process_id) > 0:
        # JAX aborts the process when the coordinator cannot be reached: check it first.
        _wait_for(address, timeout)
    elif address:
        sys.stderr.write(f"process 0: coordinator at {address}, waiting up to {timeout} s "
                         f"(distributed_timeout_s) for {int(config.num_processes) - 1} more "
                         "process(es)\n")
    # CPU devices of several processes talk over gloo (an accelerator's own backend is not
    # affected by this setting).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=timeout,
                                   heartbeat_timeout_seconds=int(
                                       config.get("heartbeat_timeout_s", 60)))
    except Exception as e:  # noqa: BLE001  (JAX raises RuntimeError / XlaRuntimeError)
        where = f"the coordinator at {address}" if address else \
            "the coordinator (detected from the environment)"
        raise DistributedError(f"could not join {where} within {timeout} s "
                               f"(distributed_timeout_s): {str(e).splitlines()[0]}") from None
    check_same_config(config, timeout)


def _wait_for(address: str, timeout_s: float) -> None:
    """Until a TCP connection to `address` ("host:port") succeeds; DistributedError after
    `timeout_s` seconds."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"coordinator_address={address!r}: expected 'host:port'")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"could not reach the coordinator at {address} within {timeout_s:g} s "
                    f"(distributed_timeout_s): {e}; is process 0 running, with "
                    "coordinator_address naming its host?") from None
            time.sleep(0.2)


_OWN_STDOUT = None  # the stdout `_stdout_for_python_only` made


def _stdout_for_python_only() -> None:
    """Native code's prints (gloo's "[Gloo] Rank 0 is connected ..." lines) go to stderr;
    sys.stdout keeps the process's real stdout, which holds the app's output alone."""
    global _OWN_STDOUT
    if sys.stdout is _OWN_STDOUT:
        return
    sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:
        return
    stream = os.fdopen(saved, "w", buffering=1, encoding=sys.stdout.encoding or "utf-8",
                       errors="replace")
    sys.stdout = _OWN_STDOUT = stream


def coordination_client():
    from jax._src import distributed  # the coordination service's key-value store
    return distributed.global_state.client


def check_same_config(config: ml_collections.ConfigDict, timeout_s: int = 300) -> None:
    """Every process publishes its settings; each compares them all, so all fail together
    (instead of hanging in the first collective) when one process was started with others."""
    if jax.process_count() == 1:
        return
    mine = {k: v for k, v in _flat(config).items() if k not in PER_PROCESS}
    text = json.dumps(mine, sort_keys=True, default=str)
    client = coordination_client()
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    client.key_value_set(f"llama2_jax/config/{jax.process_index()}", text)
    for other in range(jax.process_count()):
        theirs = client.blocking_key_value_get(f"llama2_jax/config/{other}", timeout_s * 1000)
        if theirs != text:
            theirs = json.loads(theirs)
            keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            diffs = "; ".join(f"{k}: {theirs.get(k)!r} in process {other}, {mine.get(k)!r} in "
                              f"process {jax.process_index()}" for k in keys[:5])
            raise DistributedError(f"processes were started with different settings ({diffs}); "
                                   f"start every process with the same command (config {digest})")


def _flat(config, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def on_main(name: str, fn: Callable[[], None], timeout_s: int = 300) -> None:
    """Run `fn` on process 0 only (a check and write of shared files); the other processes
    wait for it and fail with its message when it fails, so all stop together."""
    if jax.process_count() == 1:
        fn()
        return
    client, key = coordination_client(), f"llama2_jax/on_main/{name}"
    if jax.process_index() == 0:
        try:
            fn()
        except Exception as e:
            client.key_value_set(key, f"error:{e}")
            raise
        client.key_value_set(key, "ok")
        return
    result = client.blocking_key_value_get(key, timeout_s * 1000)
    if result != "ok":
        raise DistributedError(f"process 0: {result.removeprefix('error:')}")


def is_main_process() -> bool:
    return jax.process_index() == 0


def process_index() -> int:
    return jax.process_index()
