"""llama.cpp as a peer in the CPU benchmarks: built from the sources llama-cpp-python vendors.

  from benchmarks import llama_cpp_peer as lcp
  try:
      binaries = lcp.build()                    # {"llama-server": path, "llama-bench": path, ...}
  except lcp.PeerUnavailable as e:
      print(f"llama.cpp column skipped: {e}")
  lcp.write_gguf(params, cfg, tokenizer_path, "/tmp/bench.gguf")   # F32, the same weights
  with lcp.LlamaServer("/tmp/bench.gguf", slots=16, context=640, threads=2) as server:
      ...  # OpenAI-style streaming requests to server.url + "/v1/completions"
  lcp.bench_decode("/tmp/bench.gguf", threads=2, n_gen=128)       # llama-bench decode tok/s

`build` takes the llama-cpp-python 0.3.36 sdist (`pip download`, once, into the cache), unpacks
its `vendor/llama.cpp`, configures it with cmake (Release, CPU backend only, GGML_NATIVE, static,
no tests / examples / web UI / OpenSSL, nothing fetched) and builds the targets `llama-server`
and `llama-bench` only. Everything lives in `$LLAMA2_JAX_BENCH_CACHE/llama.cpp-0.3.36/`
(default `~/.cache/llama2_jax_bench/`), so later runs reuse the binaries. `LLAMA_CPP_BUILD_JOBS`
sets the parallel compile jobs (default: all CPUs). Without cmake or a C/C++ compiler, or when a
step fails, `PeerUnavailable(reason)` is raised: callers print "llama.cpp column skipped".

llama.cpp's own defaults stay otherwise: an F16 KV cache, flash attention "auto" (on, on the
CPU: its F16 rounding picks the runner-up at near-ties, so greedy tokens part from ours after
some dozens; with `-fa off` they matched ours for 128 of 128 in a check). Both tools take
`extra_args` (["-fa", "off"]; ["-ctk", "f32", "-ctv", "f32"] for an F32 KV cache, as ours).

`write_gguf` saves the weights as a transformers `LlamaForCausalLM` (benchmarks.common.
hf_model_from) with the sentencepiece tokenizer next to it and runs the vendored
`convert_hf_to_gguf.py --outtype f32` with the vendored gguf-py on PYTHONPATH.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request

from benchmarks.serving import free_port

VERSION = "0.3.36"  # llama-cpp-python; its vendor/llama.cpp is the peer
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
TARGETS = ("llama-server", "llama-bench")
CMAKE_OPTIONS = {  # LLAMA_CURL is gone from this version (deprecated, ignored): no curl
    "CMAKE_BUILD_TYPE": "Release", "BUILD_SHARED_LIBS": "OFF", "GGML_NATIVE": "ON",
    # the CPU backend only
    "GGML_CUDA": "OFF", "GGML_METAL": "OFF", "GGML_VULKAN": "OFF", "GGML_HIP": "OFF",
    "GGML_SYCL": "OFF", "GGML_OPENCL": "OFF", "GGML_RPC": "OFF", "GGML_CCACHE": "OFF",
    # the tools (server, bench) but no tests, examples, HTTPS, or web UI (npm or a download)
    "LLAMA_BUILD_TOOLS": "ON", "LLAMA_BUILD_SERVER": "ON", "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF", "LLAMA_BUILD_APP": "OFF", "LLAMA_OPENSSL": "OFF",
    "LLAMA_BUILD_UI": "OFF", "LLAMA_USE_PREBUILT_UI": "OFF",
}
DOWNLOAD_TIMEOUT = 900  # seconds, each subprocess step ...
CONFIGURE_TIMEOUT = 900
BUILD_TIMEOUT = int(os.environ.get("LLAMA_CPP_BUILD_TIMEOUT", 4 * 3600))  # ... 2 cores: slow
CONVERT_TIMEOUT = 1800


class PeerUnavailable(RuntimeError):
    """llama.cpp cannot be built or run here; str(e) says why."""


def cache_root(cache_dir: str | None = None) -> str:
    base = cache_dir or os.environ.get("LLAMA2_JAX_BENCH_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "llama2_jax_bench")
    return os.path.join(base, f"llama.cpp-{VERSION}")


def _run(cmd: list[str], what: str, timeout: float, log: str | None = None, **kw) -> None:
    """`cmd`, its output appended to `log` (else captured); PeerUnavailable naming `what` and
    the output's tail when it fails, cannot start or runs past `timeout` seconds."""
    with open(log or os.devnull, "a") as f:
        if log:
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
        try:
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, timeout=timeout, text=True,
                               stdout=f if log else subprocess.PIPE, stderr=subprocess.STDOUT,
                               **kw)
        except FileNotFoundError as e:
            raise PeerUnavailable(f"{what}: {e}") from e
        except subprocess.TimeoutExpired as e:
            raise PeerUnavailable(f"{what}: still running after {timeout:.0f} s") from e
    if p.returncode != 0:
        tail = _tail(log) if log else (p.stdout or "")[-3000:]
        raise PeerUnavailable(f"{what} failed (exit {p.returncode})"
                              + (f", log {log}" if log else "") + f":\n{tail}")


def _tail(path: str, lines: int = 25) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _compilers() -> dict[str, str]:
    """The C and C++ compilers cmake is to use: $CC / $CXX, else the first found on PATH."""
    found = {}
    for var, lang, env, names in (("CMAKE_C_COMPILER", "C", "CC", ("cc", "gcc", "clang")),
                                  ("CMAKE_CXX_COMPILER", "C++", "CXX", ("c++", "g++", "clang++"))):
        if os.environ.get(env):
            path = shutil.which(os.environ[env])
            where = f"${env}={os.environ[env]} not found"
        else:
            path = next((p for p in map(shutil.which, names) if p), None)
            where = f"none of {', '.join(names)} on PATH"
        if not path:
            raise PeerUnavailable(f"no {lang} compiler: {where}")
        found[var] = path
    return found


def sdist(root: str) -> str:
    """The llama-cpp-python sdist in `root`, downloaded with pip when missing."""
    path = os.path.join(root, SDIST)
    if os.path.exists(path):
        return path
    with tempfile.TemporaryDirectory(dir=root) as tmp:  # only a complete file lands in `root`
        # --no-binary for this package only: pip prepares the sdist's metadata, for which it
        # may install the build backend, from wheels
        _run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}",
              "--no-deps", "--no-binary", "llama-cpp-python", "-d", tmp, "-q"],
             f"pip download llama-cpp-python=={VERSION} (sdist)", DOWNLOAD_TIMEOUT)
        got = os.path.join(tmp, SDIST)
        if not os.path.exists(got):
            raise PeerUnavailable(f"pip download left {os.listdir(tmp)}, not {SDIST}")
        os.replace(got, path)
    return path


def _unpack(archive: str, dest: str) -> None:
    """vendor/llama.cpp of the sdist into `dest` (git metadata left out)."""
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    tmp = dest + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(archive) as tar:
            members = []
            for m in tar.getmembers():
                if m.name.startswith(prefix) and "/.git" not in m.name[len(prefix) - 1:]:
                    m.name = m.name[len(prefix):]
                    members.append(m)
            if not any(m.name == "CMakeLists.txt" for m in members):
                raise PeerUnavailable(f"{archive} has no {prefix}CMakeLists.txt")
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # 3.11.4+
            tar.extractall(tmp, members=members, **safe)
    except (tarfile.TarError, OSError) as e:
        raise PeerUnavailable(f"unpacking {archive}: {e} (delete it to download it again)") from e
    os.replace(tmp, dest)


def sources(cache_dir: str | None = None) -> str:
    """The vendored llama.cpp source tree (sdist downloaded and unpacked on first use)."""
    root = cache_root(cache_dir)
    src = os.path.join(root, "src")
    if not os.path.exists(os.path.join(src, "CMakeLists.txt")):
        os.makedirs(root, exist_ok=True)
        _unpack(sdist(root), src)
    return src


def build(cache_dir: str | None = None, jobs: int | None = None) -> dict[str, str]:
    """Paths of the built `llama-server` and `llama-bench` (and the sources, "src"), built on the
    first call and reused after; PeerUnavailable(reason) when that is not possible here."""
    root = cache_root(cache_dir)
    src, out = os.path.join(root, "src"), os.path.join(root, "build")
    paths = {t: os.path.join(out, "bin", t) for t in TARGETS}
    paths["src"] = src
    stamp = os.path.join(out, "built.json")
    if all(os.access(paths[t], os.X_OK) for t in TARGETS) and os.path.exists(stamp):
        return paths
    if not shutil.which("cmake"):
        raise PeerUnavailable("cmake not found on PATH")
    options = {**CMAKE_OPTIONS, **_compilers()}
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time per cache
        if all(os.access(paths[t], os.X_OK) for t in TARGETS) and os.path.exists(stamp):
            return paths  # another process built it while this one waited
        sources(cache_dir)
        log = os.path.join(root, "build.log")
        print(f"building llama.cpp ({', '.join(TARGETS)}) from llama-cpp-python {VERSION}'s "
              f"vendored sources in {root}; log {log}", flush=True)
        t0 = time.perf_counter()
        _run(["cmake", "-S", src, "-B", out, *(f"-D{k}={v}" for k, v in options.items())],
             "cmake configure of llama.cpp", CONFIGURE_TIMEOUT, log)
        jobs = jobs or int(os.environ.get("LLAMA_CPP_BUILD_JOBS", os.cpu_count() or 1))
        _run(["cmake", "--build", out, "--config", "Release", "-j", str(jobs),
              "--target", *TARGETS], "cmake build of llama.cpp", BUILD_TIMEOUT, log)
        missing = [t for t in TARGETS if not os.access(paths[t], os.X_OK)]
        if missing:
            raise PeerUnavailable(f"the build succeeded but left no {', '.join(missing)} in "
                                  f"{os.path.dirname(paths[TARGETS[0]])}")
        with open(stamp, "w") as f:
            json.dump(dict(version=VERSION, options=options, jobs=jobs,
                           seconds=time.perf_counter() - t0), f, indent=1)
    print(f"llama.cpp built in {time.perf_counter() - t0:.0f} s", flush=True)
    return paths


# -- the model --------------------------------------------------------------------------------
def write_gguf(model_params: dict, cfg, tokenizer_path: str, out_path: str,
               cache_dir: str | None = None) -> str:
    """An F32 GGUF at `out_path` of `model_params` (llama2_jax's nested dict of numpy arrays),
    `cfg` and the sentencepiece `tokenizer_path`, via transformers and the vendored converter
    (needs the sources only, no compiler). Returns `out_path`."""
    from benchmarks.common import hf_model_from

    src = sources(cache_dir)
    with tempfile.TemporaryDirectory(prefix="llama_cpp_peer.") as tmp:
        hf = hf_model_from(model_params, cfg)
        hf.save_pretrained(tmp)  # config.json + model.safetensors, fp32
        del hf
        shutil.copy(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(dict(tokenizer_class="LlamaTokenizer", add_bos_token=True,
                           add_eos_token=False, bos_token="<s>", eos_token="</s>",
                           unk_token="<unk>"), f)
        partial = out_path + ".partial"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [os.path.join(src, "gguf-py"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        _run([sys.executable, os.path.join(src, "convert_hf_to_gguf.py"), tmp,
              "--outfile", partial, "--outtype", "f32", "--model-name",
              os.path.basename(out_path).removesuffix(".gguf")],
             "convert_hf_to_gguf.py --outtype f32 (llama.cpp's converter)", CONVERT_TIMEOUT,
             cwd=src, env=env)
    os.replace(partial, out_path)
    return out_path


# -- llama-server ------------------------------------------------------------------------------
def request_body(prompt: list[int], max_tokens: int, seed: int, sampling: dict,
                 stream: bool = True) -> dict:
    """A llama-server `/v1/completions` request doing what llama2_jax's server does with
    `sampling` ({"temperature": 0} = greedy; top_p, top_k): a token-id prompt taken as it is,
    exactly `max_tokens` tokens (`ignore_eos`; llama.cpp masks EOS, ours just does not stop),
    no prompt cache, and no sampler but top-k, temperature, then top-p (on the tempered
    distribution, as ours; llama.cpp's defaults would add min-p 0.05 and top-k 40). `verbose`
    puts each chunk's token id and the count so far in `__verbose`."""
    return dict(prompt=prompt, max_tokens=max_tokens, stream=stream, ignore_eos=True,
                seed=seed, cache_prompt=False, verbose=True,
                samplers=["top_k", "temperature", "top_p"],
                temperature=sampling.get("temperature", 1.0), top_p=sampling.get("top_p", 1.0),
                top_k=sampling.get("top_k", 0), min_p=0.0, typical_p=1.0, repeat_penalty=1.0,
                presence_penalty=0.0, frequency_penalty=0.0, dry_multiplier=0.0,
                xtc_probability=0.0)


class LlamaServer:
    """`llama-server` serving `gguf` on a free port of 127.0.0.1 for a `with` block: `slots`
    parallel sequences of `context` tokens each (`-c slots*context`: the KV cache is split
    evenly between the slots; llama.cpp rounds each up to a multiple of 256), continuous
    batching, `threads` CPU threads, no prompt cache (neither the slots' nor the host-memory
    one), no web UI. Its output goes to a temporary file (`output()`), removed when the server
    stops; failures quote its end."""

    def __init__(self, gguf: str, slots: int, context: int, threads: int,
                 binaries: dict | None = None, extra_args=(), start_timeout: float = 600):
        self.binaries = binaries or build()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_timeout = start_timeout
        self.command = [self.binaries["llama-server"], "-m", gguf, "--host", "127.0.0.1",
                        "--port", str(self.port), "-np", str(slots), "-c", str(slots * context),
                        "-t", str(threads), "-tb", str(threads), "--cont-batching",
                        "--no-cache-prompt", "--cache-ram", "0", "--no-webui", *extra_args]
        self.proc = None

    def __enter__(self) -> "LlamaServer":
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".llama-server.log", delete=False)
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and self.proc is not None:
            # a request failed: say whether the server died, with the end of its log
            code = self.proc.poll()
            print(f"llama-server {'exited with ' + str(code) if code is not None else 'running'}"
                  f" when the request failed; end of its log:\n{self.output()[-3000:]}",
                  file=sys.stderr, flush=True)
        self.close()

    def _wait_ready(self) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.start_timeout:
            if self.proc.poll() is not None:
                raise PeerUnavailable(f"llama-server exited with {self.proc.returncode}:\n"
                                      f"{self.output()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        self.start_s = time.monotonic() - t0
                        return
            except (OSError, urllib.error.URLError):
                pass  # not listening yet, or 503 while the model loads
            time.sleep(0.2)
        raise PeerUnavailable(f"llama-server not ready after {self.start_timeout:.0f} s:\n"
                              f"{self.output()[-3000:]}")

    def output(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def close(self, timeout: float = 30) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` seconds; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if not self.log.closed:
            self.log.close()
            os.unlink(self.log.name)
        return self.proc.returncode

    def greedy(self, prompt: list[int], n: int, timeout: float = 300) -> list[int]:
        """`n` greedy tokens after the token-id `prompt` (one non-streamed request)."""
        body = dict(request_body(prompt, n, 0, {"temperature": 0}, stream=False),
                    return_tokens=True)
        req = urllib.request.Request(self.url + "/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())["tokens"]


# -- llama-bench -------------------------------------------------------------------------------
def bench_decode(gguf: str, threads: int, n_gen: int = 128, depth: int = 0, reps: int = 5,
                 binaries: dict | None = None, extra_args=(), timeout: float = 1800) -> dict:
    """llama.cpp's batch-1 decode: `llama-bench -p 0 -n n_gen -d depth` (tokens generated one
    at a time after `depth` tokens in the KV cache), mean and stddev over `reps` runs."""
    binaries = binaries or build()
    cmd = [binaries["llama-bench"], "-m", gguf, "-p", "0", "-n", str(n_gen), "-d", str(depth),
           "-t", str(threads), "-r", str(reps), "-o", "json", *extra_args]
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise PeerUnavailable(f"llama-bench still running after {timeout:.0f} s") from e
    if p.returncode != 0:
        raise PeerUnavailable(f"llama-bench failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    try:
        row = next(r for r in json.loads(p.stdout) if r["n_gen"] == n_gen)
    except (json.JSONDecodeError, StopIteration, KeyError, TypeError) as e:
        raise PeerUnavailable(f"llama-bench printed no n_gen={n_gen} result: "
                              f"{p.stdout[-1000:]!r}") from e
    return dict(tok_s=row["avg_ts"], stddev_tok_s=row["stddev_ts"],
                samples_tok_s=row.get("samples_ts"), n_gen=n_gen, depth=depth, reps=reps,
                threads=threads, command=" ".join(cmd),
                **{k: row[k] for k in ("build_commit", "cpu_info", "type_k", "type_v",
                                       "flash_attn", "n_batch", "n_ubatch") if k in row})
