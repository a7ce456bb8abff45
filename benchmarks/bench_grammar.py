"""Structured output: the cost of the allowed-token bitmask per generated token, and of compiling
a JSON schema, with llguidance, xgrammar and outlines-core on Llama 2's vocabulary (32000 tokens).

  pip install xgrammar outlines-core   # the two peers (llguidance is the server's dependency)
  JAX_PLATFORMS=cpu python benchmarks/bench_grammar.py
  JAX_PLATFORMS=cpu python benchmarks/bench_grammar.py --schemas=person,json_object --repeats=5

Checks the choice of llguidance in llama2_jax/serve/grammar.py. For each JSON schema, --walks
token sequences are drawn by a seeded random walk over llguidance's allowed tokens (uniform
among the allowed tokens of each step, but for whitespace-only tokens: see --whitespace_share;
a walk ends when EOS is drawn, when llguidance's matcher has stopped, or at --max_tokens).
Each is replayed in every library from a fresh matcher, --repeats times, timing only the mask
of each step (the bitmask written into an int32 [1000] array, as the server does); each
library must accept every token, and a refusal is reported (that replay stops there). The
masks are also compared with llguidance's, outside the timing: where a library's grammar for
the schema is looser or stricter (outlines-core ignores integer bounds, for one), its mask is a
different amount of work.

- llguidance: the server's own path (LLTokenizer over `fast_tokenizer(...).to_str()`,
  `LLMatcher.unsafe_compute_mask_ptr`), JSON options at their defaults (flexible whitespace).
- llguidance-json-slices: the same with `LLTokenizer.json_slices()` (the server uses the
  default, general slices).
- xgrammar: `TokenizerInfo.from_huggingface` over convert.hf_tokenizer's tokenizer.json (it
  tokenizes exactly as SentencePiece), `GrammarCompiler.compile_json_schema` (any_whitespace,
  the default), `GrammarMatcher.fill_next_token_bitmask`.
- outlines-core: a `Vocabulary` of the token strings' bytes ("▁" as a space, "<0xNN>" as the
  byte, the special tokens left out), `Index` over `build_regex_from_schema` with llguidance's
  whitespace ([ \\n\\r\\t]*; outlines' default is one optional space), `Guide.write_mask_into`.

Compile is the first construction for a schema: llguidance's `LLMatcher` (it compiles per
matcher, which the server builds per request), xgrammar's `compile_json_schema` (cached after),
outlines-core's regex and `Index` (its Guide is then cheap); "matcher" is the median of the
fresh matchers each replay builds (llguidance: the same compile again). json_object's walks
stay in the first key's string (a closing quote is rarely drawn), so it measures a long free
string. Setup is the one-off tokenizer work: the front end (tokenizer.json for llguidance; save
and `AutoTokenizer.from_pretrained`, shared by xgrammar and outlines-core) and the library's own.
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "tests", "data", "tokenizer.model")
LIBRARIES = ("llguidance", "llguidance-json-slices", "xgrammar", "outlines-core")
WHITESPACE = r"[\x20\x0A\x0D\x09]*"  # llguidance's flexible whitespace, for outlines-core


def _obj(properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


SCHEMAS = {
    "person": _obj({
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
    }),
    "order": _obj({
        "status": {"enum": ["pending", "shipped", "delivered", "cancelled"]},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        "urgent": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 32},
    }),
    "tags": _obj({
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                 "minItems": 1, "maxItems": 4},
        "count": {"type": "integer", "minimum": 0, "maximum": 1000},
    }),
    "nested": _obj({
        "user": _obj({
            "id": {"type": "integer", "minimum": 1, "maximum": 99999},
            "email": {"type": "string", "maxLength": 32},
            "role": {"enum": ["admin", "editor", "viewer"]},
        }),
        "address": _obj({
            "city": {"type": "string", "maxLength": 20},
            "zip": {"type": "string", "maxLength": 10},
        }),
        "active": {"type": "boolean"},
    }),
    "event": _obj({
        "title": {"type": "string", "maxLength": 40},
        "level": {"enum": ["debug", "info", "warn", "error"]},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                   "maxItems": 5},
        "done": {"type": "boolean"},
    }),
    "json_object": {"type": "object"},
}

FLAGS = flags.FLAGS
flags.DEFINE_string("tokenizer", TOKENIZER, "SentencePiece tokenizer.model (Llama 2's).")
flags.DEFINE_list("schemas", list(SCHEMAS), f"Schemas to run, of {', '.join(SCHEMAS)}.")
flags.DEFINE_list("libraries", list(LIBRARIES), "Libraries to run (llguidance always runs).")
flags.DEFINE_integer("max_tokens", 150, "Longest random walk, tokens.")
flags.DEFINE_integer("walks", 4, "Random walks (token sequences) per schema.")
flags.DEFINE_integer("repeats", 3, "Replays of each sequence per library (fresh matcher each).")
flags.DEFINE_integer("seed", 0, "Seed of the random walks.")
flags.DEFINE_float("whitespace_share", 0.1,
                   "Chance that a step where whitespace-only tokens and others are allowed draws "
                   "a whitespace-only one (else it draws among the others); negative: uniform over "
                   "all allowed tokens, where runs of whitespace fill most of the walk.")


def allowed(mask: np.ndarray, vocab: int) -> np.ndarray:
    """Token ids whose bit is set (bit t % 32 of word t // 32)."""
    return np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab].astype(bool)


class LLGuidance:
    name = "llguidance"
    slices = None  # the default: LLTokenizer.general_slices(), as the server has it

    def __init__(self, model_file: str, vocab: int, eos: int):
        import llguidance
        from llama2_jax.tokenizer_json import fast_tokenizer
        self.M = llguidance.LLMatcher
        t0 = time.perf_counter()
        text = fast_tokenizer(model_file).to_str()
        t1 = time.perf_counter()
        slices = None if self.slices is None else getattr(llguidance.LLTokenizer, self.slices)()
        self.tok = llguidance.LLTokenizer(text, n_vocab=vocab, eos_token=eos, slices=slices)
        t2 = time.perf_counter()
        self.setup = {"front": t1 - t0, "library": t2 - t1}
        self.grammars = {}

    def compile(self, key: str, schema: dict) -> None:
        self.grammars[key] = self.M.grammar_from_json_schema(json.dumps(schema))
        self.matcher(key)

    def matcher(self, key: str):
        m = self.M(self.tok, self.grammars[key], log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    @staticmethod
    def mask(m, out: np.ndarray) -> None:
        m.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)

    @staticmethod
    def accept(m, token: int) -> bool:
        return m.consume_token(token)


class LLGuidanceJsonSlices(LLGuidance):
    """llguidance with its JSON-specific slicer table (`LLTokenizer.json_slices()`), which the
    server does not use."""
    name = "llguidance-json-slices"
    slices = "json_slices"


class XGrammar:
    name = "xgrammar"

    def __init__(self, hf, vocab: int, front: float):
        import xgrammar as xgr
        self.xgr = xgr
        t0 = time.perf_counter()
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(info, max_threads=len(os.sched_getaffinity(0)))
        self.setup = {"front": front, "library": time.perf_counter() - t0}
        self.grammars = {}

    def compile(self, key: str, schema: dict) -> None:
        self.grammars[key] = self.compiler.compile_json_schema(json.dumps(schema))

    def matcher(self, key: str):
        return self.xgr.GrammarMatcher(self.grammars[key])

    @staticmethod
    def mask(m, out: np.ndarray) -> None:
        m.fill_next_token_bitmask(out.reshape(1, -1))

    @staticmethod
    def accept(m, token: int) -> bool:
        return m.accept_token(token)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, hf, vocab: int, eos: int, front: float):
        import outlines_core
        self.oc = outlines_core
        t0 = time.perf_counter()
        special = set(hf.all_special_ids)
        tokens: dict[bytes, list[int]] = {}
        for piece, i in hf.get_vocab().items():
            if i in special or i >= vocab:
                continue
            tokens.setdefault(token_bytes(piece), []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, tokens)
        self.setup = {"front": front, "library": time.perf_counter() - t0}
        self.indexes = {}

    def compile(self, key: str, schema: dict) -> None:
        from outlines_core.json_schema import build_regex_from_schema
        regex = build_regex_from_schema(json.dumps(schema), whitespace_pattern=WHITESPACE)
        self.indexes[key] = self.oc.Index(regex, self.vocabulary)

    def matcher(self, key: str):
        return self.oc.Guide(self.indexes[key])

    @staticmethod
    def mask(m, out: np.ndarray) -> None:
        m.write_mask_into(out.ctypes.data, out.size, 4)

    @staticmethod
    def accept(m, token: int) -> bool:
        try:
            m.advance(token, return_tokens=False)
        except Exception:  # noqa: BLE001 (outlines-core raises on a token it refuses)
            return False
        return True


def token_bytes(piece: str) -> bytes:
    """What a SentencePiece piece stands for: "<0xNN>" the byte, else its text, "▁" a space."""
    byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
    return bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode()


def walk(ll: LLGuidance, key: str, vocab: int, eos: int, rng, max_tokens: int,
         space: np.ndarray, space_share: float):
    """A token sequence drawn uniformly among llguidance's allowed tokens (whitespace-only tokens,
    `space`, with probability `space_share` where others are allowed too, if it is >= 0)."""
    m, out, seq = ll.matcher(key), np.zeros((vocab + 31) // 32, np.int32), []
    while len(seq) < max_tokens and not m.is_stopped():
        ll.mask(m, out)
        ok = allowed(out, vocab)
        if space_share >= 0 and (ok & space).any() and (ok & ~space).any():
            ok &= space if rng.random() < space_share else ~space
        token = int(rng.choice(np.flatnonzero(ok)))
        if not ll.accept(m, token):
            raise RuntimeError(f"llguidance refused its own token {token}: {m.get_error()}")
        seq.append(token)
        if token == eos:
            break
    return seq, m.is_stopped()


def replay(lib, key: str, seq: list[int], vocab: int, reference: list | None):
    """Mask times (ns) of each step, the step a token was refused at (or None), the masks, and
    how many steps' masks differ from `reference` (llguidance's)."""
    words = (vocab + 31) // 32
    t0 = time.perf_counter()
    m = lib.matcher(key)
    made = time.perf_counter() - t0
    times, masks, refused, differ = [], [], None, 0
    gc.disable()
    try:
        for step, token in enumerate(seq):
            out = np.zeros(words, np.int32)
            t0 = time.perf_counter_ns()
            lib.mask(m, out)
            times.append(time.perf_counter_ns() - t0)
            masks.append(out)
            if reference is not None and not np.array_equal(
                    allowed(out, vocab), allowed(reference[step], vocab)):
                differ += 1
            if not lib.accept(m, token):
                refused = step
                break
    finally:
        gc.enable()
    return times, refused, masks, differ, made


def fmt_ratio(x: float, ref: float) -> str:
    return f"{x / ref:.2f}x" if ref > 0 else "-"


def main(argv):
    del argv
    vocab, eos = 32000, 2
    unknown = set(FLAGS.schemas) - set(SCHEMAS) | set(FLAGS.libraries) - set(LIBRARIES)
    if unknown:
        raise app.UsageError(f"unknown schema or library: {sorted(unknown)}")
    names = ["llguidance"] + [n for n in LIBRARIES[1:] if n in FLAGS.libraries]

    libs, skipped = [LLGuidance(FLAGS.tokenizer, vocab, eos)], {}
    if "llguidance-json-slices" in names:
        libs.append(LLGuidanceJsonSlices(FLAGS.tokenizer, vocab, eos))
    if {"xgrammar", "outlines-core"} & set(names):
        from transformers import AutoTokenizer

        from convert import hf_tokenizer
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            hf_tokenizer.save(FLAGS.tokenizer, tmp)
            hf = AutoTokenizer.from_pretrained(tmp)
            front = time.perf_counter() - t0
        assert hf.eos_token_id == eos and len(hf) == vocab, (hf.eos_token_id, len(hf))
        for name in ("xgrammar", "outlines-core"):
            if name not in names:
                continue
            try:
                libs.append(XGrammar(hf, vocab, front) if name == "xgrammar"
                            else OutlinesCore(hf, vocab, eos, front))
            except Exception as e:  # noqa: BLE001 (reported as skipped)
                skipped[name] = f"setup failed: {type(e).__name__}: {e}"

    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=FLAGS.tokenizer)
    space = np.array([not sp.IsControl(i) and not sp.IsUnknown(i)
                      and set(token_bytes(sp.IdToPiece(i))) <= set(b" \n\r\t")
                      for i in range(vocab)])
    rng = np.random.default_rng(FLAGS.seed)
    rows, pooled, problems = [], {lib.name: [] for lib in libs}, []
    for key in FLAGS.schemas:
        compile_ms = {}
        for lib in libs:
            t0 = time.perf_counter()
            try:
                lib.compile(key, SCHEMAS[key])
            except Exception as e:  # noqa: BLE001 (reported)
                problems.append(f"{lib.name} could not compile {key}: {type(e).__name__}: {e}")
                continue
            compile_ms[lib.name] = (time.perf_counter() - t0) * 1e3
        live = [lib for lib in libs if lib.name in compile_ms]
        times = {lib.name: [] for lib in live}
        made = {lib.name: [] for lib in live}
        differ = {lib.name: 0 for lib in live}
        refused = {lib.name: 0 for lib in live}
        tokens = 0
        for w in range(FLAGS.walks):
            seq, stopped = walk(libs[0], key, vocab, eos, rng, FLAGS.max_tokens, space,
                               FLAGS.whitespace_share)
            tokens += len(seq)
            ending = ("EOS" if seq[-1] == eos else "stopped" if stopped
                      else f"cap ({FLAGS.max_tokens})")
            print(f"{key} walk {w}: {len(seq)} tokens, ends by {ending}: "
                  f"{json.dumps(sp.Decode([t for t in seq if t != eos]))[:200]}", flush=True)
            for rep in range(FLAGS.repeats):
                reference = None
                for lib in live:
                    t, r, masks, d, mk = replay(lib, key, seq, vocab, reference)
                    if lib.name == "llguidance":
                        reference = masks
                    times[lib.name] += t
                    made[lib.name].append(mk)
                    if rep == 0:
                        differ[lib.name] += d
                        if r is not None:
                            refused[lib.name] += 1
                            problems.append(f"{lib.name} refused token {r} ({seq[r]}: "
                                            f"{sp.IdToPiece(seq[r])!r}) of {key} walk {w}")
        ref = np.median(times["llguidance"])
        for lib in live:
            t = np.asarray(times[lib.name], dtype=np.float64) / 1e3
            if key != "json_object" or FLAGS.schemas == ["json_object"]:
                pooled[lib.name].append(t)
            rows.append((key, lib.name, tokens, compile_ms[lib.name],
                         np.median(made[lib.name]) * 1e3, np.median(t), np.percentile(t, 90),
                         t.max(), fmt_ratio(np.median(t) * 1e3, ref),
                         differ[lib.name] if lib.name != "llguidance" else "-",
                         refused[lib.name]))

    print(f"\n{FLAGS.walks} walks per schema, each replayed {FLAGS.repeats} times per library; "
          f"times in the pooled steps of all replays.\n")
    print("| schema | library | tokens | compile ms | matcher ms | mask median µs | p90 µs | "
          "max µs | median vs llguidance | steps whose mask ≠ llguidance's | walks refused |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, name, n, c, mk, med, p90, mx, ratio, d, r in rows:
        print(f"| {key} | {name} | {n} | {c:.2f} | {mk:.3f} | {med:.1f} | {p90:.1f} | "
              f"{mx:.0f} | {ratio} | {d} | {r} |")
    print("\nThe schemas' steps pooled (json_object's apart, but for a run of it alone):\n")
    print("| library | steps timed | mask median µs | p90 µs | max µs | median vs llguidance | "
          "tokenizer setup s (front end + library) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    ref = np.median(np.concatenate(pooled["llguidance"]))
    for lib in libs:
        if not pooled[lib.name]:
            continue
        t = np.concatenate(pooled[lib.name])
        print(f"| {lib.name} | {t.size} | {np.median(t):.1f} | {np.percentile(t, 90):.1f} | "
              f"{t.max():.0f} | {fmt_ratio(np.median(t), ref)} | "
              f"{lib.setup['front']:.2f} + {lib.setup['library']:.2f} |")
    for name, why in skipped.items():
        print(f"| {name} | skipped: {why} | | | | | |")
    for p in problems:
        print(f"- {p}")


if __name__ == "__main__":
    app.run(main)
