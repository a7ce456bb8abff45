"""Peak anonymous memory and time of converting a random Meta-format checkpoint (7B by default).

  python benchmarks/bench_convert.py                     # 7B: writes 13.5 GB, then deletes it
  python benchmarks/bench_convert.py --preset=small      # a 0.1B model, to try the script

Writes `consolidated.NN.pth` shards of random bf16 weights with Meta's exact params.json (and
tokenizer.model one level up, with vocab_size -1, as in Meta's download), evicts them from the
page cache, then runs the unmodified command line

  python -m convert.meta_to_orbax --input_dir=... --output_dir=... --progress=false

in a child process, and spot-checks the result against the source tensors.

Memory is the child's RssAnon (anonymous pages: heap, numpy/torch buffers), sampled from
/proc/PID/status by this process every --interval_ms. The kernel's own peak counters do not fit:
VmHWM counts the memory-mapped input shards the converter reads (file-backed, reclaimable), and a
cgroup's memory.peak counts page cache. Sampling from outside the converter is never held up by
its GIL; the converter's buffers live for a whole layer (tens of ms or more), far longer than the
interval, so the sampled maximum is the peak.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import app, flags  # noqa: E402

from convert import common, mapping  # noqa: E402
from convert.orbax_io import open_params  # noqa: E402
from convert.sources import MetaSource  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "tests", "data", "tokenizer.model")
# Meta's params.json files, verbatim, and their shard counts.
PRESETS = {
    "7b": ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
            "vocab_size": -1}, 1),
    "13b": ({"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05,
             "vocab_size": -1}, 2),
    "70b": ({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64,
             "n_kv_heads": 8, "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}, 8),
    # 70B's shapes with 4 of its 80 layers: each tensor the converter holds is 70B's, so the
    # peak memory is 70B's (it does not grow with depth) from 1/20 of the disk.
    "70b-4l": ({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64,
                "n_kv_heads": 8, "n_layers": 4, "norm_eps": 1e-05, "vocab_size": -1}, 8),
    "small": ({"dim": 1024, "multiple_of": 256, "n_heads": 8, "n_layers": 4, "norm_eps": 1e-05,
               "vocab_size": -1}, 2),
}

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "7b", list(PRESETS), "Meta model shape to write and convert.")
flags.DEFINE_string("workdir", "/tmp/llama2_jax_bench_convert", "Scratch directory (deleted).")
flags.DEFINE_float("interval_ms", 5.0, "RssAnon sampling interval.")
flags.DEFINE_bool("keep", False, "Keep the random checkpoint and the conversion output.")


def write_random_meta(model_dir: str, params: dict, n_shards: int, seed: int = 0) -> int:
    """Random bf16 Meta shards. Tensors live in file-backed memory while torch.save writes them,
    so making a 13.5 GB checkpoint needs no RAM beyond the page cache. Returns bytes written."""
    from llama2_jax.model.config import from_meta_params
    from llama2_jax.tokenizer import Tokenizer
    os.makedirs(model_dir)
    shutil.copyfile(TOKENIZER, os.path.join(os.path.dirname(model_dir), "tokenizer.model"))
    with open(os.path.join(model_dir, "params.json"), "w") as f:
        json.dump(params, f)
    cfg = from_meta_params(params, vocab_size=Tokenizer(TOKENIZER).vocab_size)
    gen = torch.Generator().manual_seed(seed)
    scratch = os.path.join(model_dir, "scratch")
    os.makedirs(scratch)
    files = ["params.json"]
    for s in range(n_shards):
        tensors = {}
        for path, _, name in mapping.meta_names(cfg):
            shape = mapping.meta_shard_shape(path, cfg, n_shards)
            t = torch.from_file(os.path.join(scratch, name), shared=True,
                                size=int(np.prod(shape)), dtype=torch.bfloat16).view(shape)
            if path[-1] == "weight":
                t.normal_(1.0, 0.05, generator=gen)
            else:
                t.normal_(0.0, 0.02, generator=gen)
            tensors[name] = t
        files.append(f"consolidated.{s:02d}.pth")
        torch.save(tensors, os.path.join(model_dir, files[-1]))
        del tensors
        shutil.rmtree(scratch)
        os.makedirs(scratch)
    shutil.rmtree(scratch)
    with open(os.path.join(model_dir, "checklist.chk"), "w") as f:
        for name in files:
            f.write(f"{_md5(os.path.join(model_dir, name))}  {name}\n")
    return sum(os.path.getsize(os.path.join(model_dir, n)) for n in files)


def _md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def evict(directory: str) -> None:
    """Drop `directory`'s files from the page cache (only ours: no global drop_caches)."""
    for root, _, names in os.walk(directory):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/status that matter here, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def run_sampled(cmd: list[str], interval: float) -> dict:
    """Run `cmd`, sampling its RssAnon; returns peaks, wall time and output."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    peak = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    samples = 0
    while proc.poll() is None:
        try:
            for key, value in _status(proc.pid).items():
                peak[key] = max(peak[key], value)
            samples += 1
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(interval)
    output = proc.communicate()[0]
    return {"returncode": proc.returncode, "seconds": time.perf_counter() - start,
            "peak": peak, "samples": samples, "output": output}


def spot_check(model_dir: str, output_dir: str) -> int:
    """Compare a few converted tensors with the source, bit for bit; returns the count."""
    source = MetaSource(model_dir, tokenizer=os.path.join(os.path.dirname(model_dir),
                                                          "tokenizer.model"),
                        skip_checksum=True, progress=False)
    stores = open_params(os.path.join(output_dir, "params"))
    checked = 0
    last = source.cfg.n_layers - 1
    for path, layer in [(("tok_embeddings",), None), (("output",), None),
                        (("layers", "attention", "wq"), 0), (("layers", "attention", "wk"), last),
                        (("layers", "feed_forward", "w2"), last),
                        (("layers", "ffn_norm", "weight"), 1)]:
        store = stores
        for key in path:
            store = store[key]
        got = (store if layer is None else store[layer]).read().result()
        want = source.read(path, layer, source.dtype)
        if not np.array_equal(got.view(np.uint16), want.view(np.uint16)):
            raise AssertionError(f"{'/'.join(path)} layer {layer}: converted != source")
        checked += 1
    return checked


def main(argv):
    del argv
    common.quiet_logs()
    params, n_shards = PRESETS[FLAGS.preset]
    work = os.path.abspath(FLAGS.workdir)
    if os.path.exists(work):
        shutil.rmtree(work)
    model_dir, output_dir = os.path.join(work, f"llama-2-{FLAGS.preset}"), os.path.join(work, "out")
    try:
        t = time.perf_counter()
        size = write_random_meta(model_dir, params, n_shards)
        print(f"wrote random {FLAGS.preset} Meta checkpoint: {size / 1e9:.2f} GB in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        cmd = [sys.executable, "-m", "convert.meta_to_orbax", f"--input_dir={model_dir}",
               f"--output_dir={output_dir}", "--progress=false"]
        reports = []
        for extra in ([], ["--skip_checksum"]):  # the default command, then without the md5s
            shutil.rmtree(output_dir, ignore_errors=True)
            evict(work)  # cold page cache, as after a download
            result = run_sampled(cmd + extra, FLAGS.interval_ms / 1000)
            print(result["output"], flush=True)
            if result["returncode"]:
                raise SystemExit(f"conversion failed with exit code {result['returncode']}")
            out_size = sum(os.path.getsize(os.path.join(r, n))
                           for r, _, ns in os.walk(output_dir) for n in ns)
            reports.append({
                "preset": FLAGS.preset, "shards": n_shards, "input_bytes": size,
                "output_bytes": out_size, "seconds": round(result["seconds"], 1),
                "peak_rss_anon_bytes": result["peak"]["RssAnon"],
                "peak_rss_file_bytes": result["peak"]["RssFile"],
                "vm_hwm_bytes": result["peak"]["VmHWM"], "samples": result["samples"],
                "tensors_spot_checked": spot_check(model_dir, output_dir),
                "command": " ".join(cmd[1:] + extra),
            })
        print(json.dumps(reports, indent=2))
        for r in reports:
            print(f"\n{r['command']}\n  peak RssAnon {r['peak_rss_anon_bytes'] / 2**30:.2f} GiB, "
                  f"{r['seconds']:.0f} s, input {size / 1e9:.2f} GB -> output "
                  f"{r['output_bytes'] / 1e9:.2f} GB")
    finally:
        if not FLAGS.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
