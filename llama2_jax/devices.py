"""The devices a plan is for: a table of accelerators' memory, the devices JAX sees, and the
`--devices` spelling ("8 x tpu-v5e", "2 x h100", "cpu")."""

from __future__ import annotations

import dataclasses
import os
import re

import jax

GiB = 1 << 30
MiB = 1 << 20


class PlanError(ValueError):
    """Settings a plan cannot be made for (unknown device, bad number)."""


# Memory one JAX device has: (bytes, platform). TPU v2/v3 show each core as a device, v4 and
# later each chip; GPUs as the driver reports them (nvidia-smi's MiB).
DEVICES: dict[str, tuple[int, str]] = {
    "tpu-v2": (8 * GiB, "tpu"),
    "tpu-v3": (16 * GiB, "tpu"),
    "tpu-v4": (32 * GiB, "tpu"),
    "tpu-v5e": (16 * GiB, "tpu"),
    "tpu-v5p": (95 * GiB, "tpu"),
    "tpu-v6e": (32 * GiB, "tpu"),
    "h100": (81559 * MiB, "gpu"),
    "h200": (143771 * MiB, "gpu"),
    "a100-40": (40960 * MiB, "gpu"),
    "a100-80": (81920 * MiB, "gpu"),
    "l4": (23034 * MiB, "gpu"),
    "t4": (15360 * MiB, "gpu"),
}
# Peak dense bf16 FLOP/s and HBM bandwidth (bytes/s) of one JAX device, from the vendors'
# public specs (v2/v3: half a chip's): for estimates from the compiler's cost analysis
# (llama2_jax.aot.estimate), never for a plan's memory.
PEAKS: dict[str, tuple[float, float]] = {
    "tpu-v2": (22.5e12, 350e9),
    "tpu-v3": (61.5e12, 450e9),
    "tpu-v4": (275e12, 1228e9),
    "tpu-v5e": (197e12, 819e9),
    "tpu-v5p": (459e12, 2765e9),
    "tpu-v6e": (918e12, 1640e9),
    "h100": (989e12, 3350e9),
    "h200": (989e12, 4800e9),
    "a100-40": (312e12, 1555e9),
    "a100-80": (312e12, 2039e9),
    "l4": (121e12, 300e9),
    "t4": (65e12, 320e9),
}
# JAX takes this share of a GPU's memory at start (XLA_PYTHON_CLIENT_MEM_FRACTION).
GPU_FRACTION = 0.75

@dataclasses.dataclass(frozen=True)
class Devices:
    count: int
    kind: str  # a DEVICES name, or "cpu"
    bytes: int  # memory of one device the plan may use
    platform: str  # cpu | gpu | tpu
    source: str  # where `bytes` comes from

    def __str__(self) -> str:
        return f"{self.count} x {self.kind}"


def available_ram() -> int:
    """This machine's RAM (MemTotal of /proc/meminfo): what a process may plan for. Not
    MemAvailable, which moves with whatever else runs (a plan would then refuse a run that
    fits, or accept one that fits only while the machine is idle)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_devices(spec: str) -> Devices:
    """"8 x tpu-v5e", "2xh100", "h100", "cpu" (this machine's RAM), "" (the devices present)."""
    spec = spec.strip().lower()
    if not spec:
        return present_devices()
    m = re.fullmatch(r"(?:(\d+)\s*x\s*)?([a-z0-9.-]+)", spec)
    if not m:
        raise PlanError(f"--devices={spec!r}: expected '<count> x <kind>', e.g. '8 x tpu-v5e'")
    count, kind = int(m.group(1) or 1), m.group(2)
    if count < 1:
        raise PlanError(f"--devices={spec!r}: the count must be >= 1")
    if kind == "cpu":
        return Devices(count, "cpu", available_ram() // count, "cpu", "MemTotal")
    if kind not in DEVICES:
        raise PlanError(f"unknown device kind {kind!r}; known: cpu, {', '.join(DEVICES)}")
    size, platform = DEVICES[kind]
    fraction = gpu_fraction() if platform == "gpu" else 1.0
    source = "table" + (f" x {fraction:g} (JAX's share of a GPU)" if platform == "gpu" else "")
    return Devices(count, kind, int(size * fraction), platform, source)


def gpu_fraction() -> float:
    if os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() == "false":
        return 1.0
    try:
        return float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_FRACTION))
    except ValueError:
        return GPU_FRACTION


def present_devices() -> Devices:
    """The devices JAX sees, with their memory as the backend reports it."""
    devices = jax.devices()
    d = devices[0]
    if d.platform == "cpu":
        return Devices(len(devices), "cpu", available_ram() // len(devices), "cpu",
                       "MemTotal")
    stats = d.memory_stats() or {}
    kind = _kind_name(d.device_kind)
    if stats.get("bytes_limit"):
        return Devices(len(devices), kind, int(stats["bytes_limit"]), d.platform,
                       "memory_stats")
    if kind in DEVICES:
        return dataclasses.replace(parse_devices(f"{len(devices)} x {kind}"), kind=kind)
    raise PlanError(f"the {d.device_kind} devices report no memory; name them with "
                    f"--devices (known: {', '.join(DEVICES)})")


def _kind_name(device_kind: str) -> str:
    k = device_kind.lower()
    for name in ("h200", "h100", "l4", "t4"):
        if name in k:
            return name
    if "a100" in k:
        return "a100-80" if "80" in k else "a100-40"
    m = re.search(r"tpu v?(\d[a-z]?)( lite)?", k)
    if m:
        return f"tpu-v{m.group(1)}" + ("e" if m.group(2) and not m.group(1).endswith("e")
                                       else "")
    return k.replace(" ", "-")
