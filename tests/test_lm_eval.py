"""lm-evaluation-harness's `local-completions` model against `python -m llama2_jax.serve`.

lm-eval (lm_eval >= 0.4) scores a continuation by POSTing the context's and continuation's
token ids, concatenated, to /v1/completions with `echo: true, logprobs: 1, max_tokens: 1,
temperature: 0`, and summing the echoed `token_logprobs[ctxlen:-1]` (the last entry is the
one generated token); a continuation is greedy when each of its logprobs equals the largest
value of its `top_logprobs` entry. Here it runs on local tasks this test writes into tmp_path
(multiple choice, loglikelihood, rolling perplexity) with a local Hugging Face tokenizer built
from tests/data/tokenizer.model, nothing downloaded, and every number it reports is computed
again from `llama2_jax.forward` on the token ids it sent.
"""

import json
import math
import os
import re
import socket

# Before lm_eval imports datasets and huggingface_hub: local files only.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import lm_eval  # noqa: E402
from lm_eval.models.openai_completions import LocalCompletionsAPI  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import llama2_jax  # noqa: E402
from llama2_jax.model import checkpoint  # noqa: E402
from llama2_jax.model.config import TINY  # noqa: E402
from tests.conftest import TOKENIZER, save_random, serving  # noqa: E402
from convert.hf_tokenizer import save as save_hf_tokenizer  # noqa: E402

CFG = TINY.replace(vocab_size=32000, max_seq_len=512)
CONTEXT = 256
MODEL = "tiny-base"  # lm-eval warns about chat templates for a name with "chat"
BOS = 1
ROLLING_MAX_LENGTH = 40  # lm-eval's max_length for the perplexity run: windows of 38 tokens


def tol(n_tokens: int) -> float:
    """Tolerance on a sum of n tokens' logprobs, server against `forward` (they differed by
    2e-6 per token at most when this was written)."""
    return max(1e-4, 1e-5 * n_tokens)


# Multiple choice: prompts with a trailing space or newline (lm-eval moves it into the
# continuation), choices with a leading space, digits, accents and an emoji (byte tokens).
MC_DOCS = [
    {"prompt": "Question: What is the capital of France?\nAnswer:",
     "choices": ["Paris", "London", "Berlin", "Madrid"], "label": 0},
    {"prompt": "Question: Which animal says moo?\nAnswer:",
     "choices": ["a cat", "a cow", "a llama 🦙", "a duck"], "label": 1},
    {"prompt": "2 + 2 =", "choices": ["4", "22", "5", "four"], "label": 0},
    {"prompt": "The word with an umlaut is",
     "choices": ["uber", "über", "ueber"], "label": 1},
    {"prompt": "The opposite of hot is ",
     "choices": ["cold", "warm", " cool", "frío"], "label": 0},
    {"prompt": "Q: Name a colour.\nA:\n",
     "choices": ["red", "Red.", "the colour red"], "label": 2},
    {"prompt": "Llamas live in the",
     "choices": ["Andes", "Alps", "sea", "日本"], "label": 0},
    {"prompt": "Finish the sentence: The quick brown fox",
     "choices": ["jumps over the lazy dog.", "sleeps.", "is slow"], "label": 0},
]

# Loglikelihood (acc = is_greedy): the fixture appends items whose target is the tiny model's
# greedy continuation, so that both greedy and non-greedy items are scored.
LL_DOCS = [
    {"context": "The llama is", "target": " a camelid"},
    {"context": "Once upon a time", "target": ", there was a llama."},
    {"context": "1, 2, 3,", "target": " 4"},
]
GREEDY_CONTEXTS = ["The alpaca is", "In the Andes", "Hello, my name is", "Über alles"]

# Rolling perplexity: a short text (one window) and longer ones (several windows of 38).
ROLLING_DOCS = [
    {"text": "Llamas are social animals."},
    {"text": "The llama (Lama glama) is a domesticated South American camelid, widely used "
             "as a meat and pack animal by Andean cultures since the pre-Columbian era. "
             "Llamas are social animals and live with others as a herd. Their wool is soft "
             "and contains only a small amount of lanolin. Llamas can learn simple tasks "
             "after a few repetitions; when using a pack, they can carry about 25 to 30% "
             "of their body weight for 8 to 13 km."},
    {"text": "Über den Wolken muss die Freiheit wohl grenzenlos sein. 🦙 The alpaca is "
             "smaller than the llama,\nand its fibre is used for knitted and woven items, "
             "similar to sheep's wool; 12 colours are recognised in Peru."},
]


# -- a local Hugging Face tokenizer equal to the SentencePiece model ---------------------------
def hf_tokenizer_dir(model_file: str, out) -> str:
    """A tokenizer directory AutoTokenizer loads offline (what the HF export writes)."""
    save_hf_tokenizer(model_file, str(out))
    return str(out)


# -- the local tasks ---------------------------------------------------------------------------
def write_tasks(root, ll_docs) -> str:
    """Task YAMLs and their JSONL data under `root` (the datasets cache too); returns the
    include_path."""
    tasks, cache = root / "tasks", root / "datasets_cache"
    tasks.mkdir()
    def metrics(**aggregations):
        return "metric_list:\n" + "".join(
            f"  - metric: {m}\n    aggregation: {a}\n"
            f"    higher_is_better: {str(a == 'mean').lower()}\n"
            for m, a in aggregations.items())

    common = ("dataset_path: json\n"
              "test_split: test\n"
              "dataset_kwargs:\n"
              "  data_files:\n"
              "    test: {data}\n"
              f"  cache_dir: {json.dumps(str(cache))}\n"
              "metadata:\n"
              "  version: 1.0\n")
    specs = {
        "tiny_mc": (MC_DOCS, "output_type: multiple_choice\n"
                             "doc_to_text: prompt\n"
                             "doc_to_choice: choices\n"
                             "doc_to_target: label\n"
                             + metrics(acc="mean", acc_norm="mean",
                                       acc_mutual_info="mean")),
        "tiny_ll": (ll_docs, "output_type: loglikelihood\n"
                             "doc_to_text: context\n"
                             "doc_to_target: target\n"
                             + metrics(perplexity="perplexity", acc="mean")),
        "tiny_ppl": (ROLLING_DOCS, "output_type: loglikelihood_rolling\n"
                                   'doc_to_text: ""\n'
                                   "doc_to_target: text\n"
                                   + metrics(word_perplexity="weighted_perplexity",
                                             byte_perplexity="weighted_perplexity",
                                             bits_per_byte="bits_per_byte")),
    }
    for name, (docs, spec) in specs.items():
        data = tasks / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
                        encoding="utf-8")
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\n" + spec + common.format(data=json.dumps(str(data))),
            encoding="utf-8")
    return str(tasks)


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, one_device_mesh):
    return save_random(tmp_path_factory, one_device_mesh, MODEL, CFG, seed=5)


@pytest.fixture(scope="module")
def lm_server(tiny_dir):
    with serving(tiny_dir, MODEL, max_slots=4, context_length=CONTEXT, prefill_chunk=32,
                 prefix_cache_mb=8) as s:
        yield s


@pytest.fixture(scope="module")
def ref(tiny_dir, one_device_mesh):
    return checkpoint.load(tiny_dir, mesh=one_device_mesh)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return hf_tokenizer_dir(TOKENIZER, tmp_path_factory.mktemp("lm_eval_tok") / "llama2")


@pytest.fixture
def local_only(monkeypatch):
    """Sockets may connect to 127.0.0.1 only: nothing is downloaded."""
    def guard(connect):
        def guarded(self, address):
            if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in (
                    "127.0.0.1", "::1", "localhost"):
                raise OSError(f"test_lm_eval: a connection to {address} (nothing may be "
                              "downloaded)")
            return connect(self, address)
        return guarded
    monkeypatch.setattr(socket.socket, "connect", guard(socket.socket.connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guard(socket.socket.connect_ex))


@pytest.fixture
def sent(monkeypatch):
    """Every payload lm-eval posts."""
    payloads = []
    create = LocalCompletionsAPI._create_payload

    def spy(self, *args, **kwargs):
        payload = create(self, *args, **kwargs)
        payloads.append(payload)
        return payload
    monkeypatch.setattr(LocalCompletionsAPI, "_create_payload", spy)
    return payloads


# -- the reference, from `forward` -------------------------------------------------------------
class Scorer:
    """Log-likelihoods of token-id continuations by `llama2_jax.forward`, cached."""

    def __init__(self, model):
        self.model, self.cache = model, {}

    def logp(self, ids) -> np.ndarray:
        ids = tuple(ids)
        if ids not in self.cache:
            self.cache[ids] = np.asarray(jax.nn.log_softmax(
                llama2_jax.forward(self.model, list(ids)), axis=-1))
        return self.cache[ids]

    def score(self, ctx, cont) -> tuple[float, bool]:
        """(sum of log p(cont | ctx), whether cont is the greedy continuation)."""
        logp = self.logp(list(ctx) + list(cont))[len(ctx) - 1:-1]
        lps = [float(logp[i, t]) for i, t in enumerate(cont)]
        greedy = all(int(np.argmax(logp[i])) == t for i, t in enumerate(cont))
        return sum(lps), greedy


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The ids lm-eval sends for (context, continuation) with add_bos_token=True: trailing
    whitespace of the context moves to the continuation; the continuation's ids are those of
    the whole text after the context's; an empty context is BOS alone."""
    if context == "":
        return [BOS], tokenizer.encode(continuation, bos=False)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tokenizer.encode(context, bos=True)
    return ctx, tokenizer.encode(context + continuation, bos=True)[len(ctx):]


def rolling_windows(ids: list[int], window: int) -> list[tuple[list[int], int]]:
    """lm-eval's loglikelihood_rolling windows of a text's ids (no BOS), as (sequence sent,
    number of its last tokens scored): the first is BOS + up to `window` tokens, all scored;
    each next one the `window` + 1 tokens ending at its last new token."""
    first = min(window, len(ids))
    out, done = [([BOS] + ids[:first], first)], first
    while done < len(ids):
        end = min(done + window, len(ids))
        out.append((ids[end - window - 1:end], end - done))
        done = end
    return out


def greedy_docs(scorer, tokenizer) -> list[dict]:
    """Items whose target is the model's greedy continuation (1 or 2 tokens), where its text
    tokenizes back to the same ids after the context."""
    docs = []
    for i, context in enumerate(GREEDY_CONTEXTS):
        ids = tokenizer.encode(context, bos=True)
        for _ in range(1 + i % 2):
            ids = ids + [int(np.argmax(scorer.logp(ids)[-1]))]
        target = tokenizer.decode(ids[1:])[len(context):]
        if target and tokenizer.encode(context + target, bos=True) == ids:
            docs.append({"context": context, "target": target})
    return docs


# -- lm-eval -----------------------------------------------------------------------------------
def evaluate(server, tokenizer_dir, include_path, tasks, **model_args):
    args = {"base_url": server.url + "/v1/completions", "model": MODEL,
            "tokenizer": tokenizer_dir, "tokenizer_backend": "huggingface",
            "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1, "timeout": 60,
            **model_args}
    return lm_eval.simple_evaluate(
        model="local-completions", model_args=args, tasks=tasks,
        task_manager=TaskManager(include_path=include_path, include_defaults=False),
        bootstrap_iters=0, log_samples=True, torch_random_seed=None, verbosity="WARNING")


def sent_sequences(payloads) -> list[tuple[int, ...]]:
    out = []
    for p in payloads:
        assert p["echo"] is True and p["logprobs"] >= 1, p
        prompts = p["prompt"]
        assert prompts and all(isinstance(x, list) for x in prompts), p  # token ids
        out += [tuple(x) for x in prompts]
    return sorted(out)


def test_hf_tokenizer_is_the_sentencepiece_model(hf_tokenizer, tokenizer):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(hf_tokenizer)
    texts = [d["prompt"] + " " + c for d in MC_DOCS for c in d["choices"]]
    texts += [d["text"] for d in ROLLING_DOCS] + [" Hello", "  two  spaces  ", "a\n\n b",
                                                   "", " ", "x   ", "\t tab", "日本語 🦙"]
    for text in texts:
        assert hf(text).input_ids == tokenizer.encode(text, bos=True), text
        assert hf(text, add_special_tokens=False).input_ids == tokenizer.encode(text, bos=False)
    assert (hf.bos_token_id, hf.eos_token_id) == (tokenizer.bos_id, tokenizer.eos_id)


@pytest.fixture(scope="module")
def scorer(ref):
    return Scorer(ref)


@pytest.fixture(scope="module")
def ll_docs(scorer, tokenizer):
    return LL_DOCS + greedy_docs(scorer, tokenizer)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory, ll_docs):
    return write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"), ll_docs)


def test_multiple_choice_and_loglikelihood_equal_forward(lm_server, scorer, tokenizer,
                                                         hf_tokenizer, tasks_dir, ll_docs,
                                                         local_only, sent):
    # BOS + text, as Llama was trained (add_bos_token); one continuation per request.
    out = evaluate(lm_server, hf_tokenizer, tasks_dir, ["tiny_mc", "tiny_ll"],
                   add_bos_token=True, batch_size=1)
    results, samples = out["results"], out["samples"]

    expected_seqs = []
    # -- tiny_mc
    per_doc = {"acc": [], "acc_norm": [], "acc_mutual_info": []}
    by_doc = {s["doc_id"]: s for s in samples["tiny_mc"]}
    assert sorted(by_doc) == list(range(len(MC_DOCS)))
    for i, doc in enumerate(MC_DOCS):
        pairs = [encode_pair(tokenizer, doc["prompt"], " " + c) for c in doc["choices"]]
        uncond = [encode_pair(tokenizer, "", " " + c) for c in doc["choices"]]
        scored = [scorer.score(*p) for p in pairs + uncond]
        expected_seqs += [tuple(c + t) for c, t in pairs + uncond]
        got = [float(r[0]) for r in by_doc[i]["filtered_resps"]]
        n_tokens = [len(t) for _, t in pairs + uncond]
        assert len(got) == len(scored), by_doc[i]
        for g, (ll, _), n in zip(got, scored, n_tokens):
            assert g == pytest.approx(ll, abs=tol(n)), (doc, got, scored)
        lls = np.array([ll for ll, _ in scored[:len(pairs)]])
        mi = lls - np.array([ll for ll, _ in scored[len(pairs):]])
        norm = lls / np.array([len(c) for c in doc["choices"]], dtype=float)
        for name, values in (("acc", lls), ("acc_norm", norm), ("acc_mutual_info", mi)):
            top2 = np.sort(values)[-2:]
            assert top2[1] - top2[0] > 1e-2, f"near tie in {name} of {doc}: change the data"
            per_doc[name].append(float(np.argmax(values) == doc["label"]))
            assert by_doc[i][name] == per_doc[name][-1], (name, doc, values)
    for name, values in per_doc.items():
        assert results["tiny_mc"][f"{name},none"] == pytest.approx(np.mean(values), abs=1e-9)

    # -- tiny_ll
    by_doc = {s["doc_id"]: s for s in samples["tiny_ll"]}
    lls, greedy = [], []
    for i, doc in enumerate(ll_docs):
        ctx, cont = encode_pair(tokenizer, doc["context"], doc["target"])
        ll, is_greedy = scorer.score(ctx, cont)
        expected_seqs.append(tuple(ctx + cont))
        got_ll, got_greedy = by_doc[i]["filtered_resps"][0]
        assert float(got_ll) == pytest.approx(ll, abs=tol(len(cont))), doc
        assert bool(got_greedy) == is_greedy, (doc, ll)
        lls.append(ll)
        greedy.append(is_greedy)
    assert any(greedy) and not all(greedy), (ll_docs, greedy)  # both kinds scored
    n_max = max(len(encode_pair(tokenizer, d["context"], d["target"])[1]) for d in ll_docs)
    assert results["tiny_ll"]["acc,none"] == pytest.approx(np.mean(greedy), abs=1e-9)
    assert results["tiny_ll"]["perplexity,none"] == pytest.approx(
        math.exp(-np.mean(lls)), rel=tol(n_max))

    # What lm-eval sent: exactly these token-id sequences, one per continuation.
    assert sent_sequences(sent) == sorted(expected_seqs)
    assert {p["max_tokens"] for p in sent} == {1}  # lm-eval's [ctxlen:-1] drops 1 token



def test_rolling_perplexity_equals_forward(lm_server, scorer, tokenizer, hf_tokenizer,
                                           tasks_dir, local_only, sent):
    # add_bos_token=False: lm-eval puts BOS (its prefix token) before the first window itself;
    # with True the text's ids would start with a second BOS, scored as a token of the text.
    # Windows of 38 tokens, several windows per request (batch_size), requests concurrently.
    out = evaluate(lm_server, hf_tokenizer, tasks_dir, ["tiny_ppl"], add_bos_token=False,
                   max_length=ROLLING_MAX_LENGTH, batch_size=4, num_concurrent=2)
    window = ROLLING_MAX_LENGTH - 2
    total_ll, words, n_bytes, n_tokens, expected_seqs = 0.0, 0, 0, 0, []
    by_doc = {s["doc_id"]: s for s in out["samples"]["tiny_ppl"]}
    for i, doc in enumerate(ROLLING_DOCS):
        ids = tokenizer.encode(doc["text"], bos=False)
        ll = 0.0
        for seq, k in rolling_windows(ids, window):
            ll += scorer.score(seq[:-k], seq[-k:])[0]
            expected_seqs.append(tuple(seq))
        got = by_doc[i]["filtered_resps"][0]
        got = got[0] if isinstance(got, (list, tuple)) else got
        assert float(got) == pytest.approx(ll, abs=tol(len(ids))), doc
        total_ll += ll
        words += len(re.split(r"\s+", doc["text"]))
        n_bytes += len(doc["text"].encode("utf-8"))
        n_tokens += len(ids)
    assert len(rolling_windows(tokenizer.encode(ROLLING_DOCS[1]["text"], bos=False),
                               window)) > 2
    assert sent_sequences(sent) == sorted(expected_seqs)
    rel = tol(n_tokens)
    r = out["results"]["tiny_ppl"]
    assert r["word_perplexity,none"] == pytest.approx(math.exp(-total_ll / words),
                                                      rel=rel / words)
    assert r["byte_perplexity,none"] == pytest.approx(math.exp(-total_ll / n_bytes),
                                                      rel=rel / n_bytes)
    assert r["bits_per_byte,none"] == pytest.approx(-total_ll / n_bytes / math.log(2),
                                                    abs=rel / n_bytes / math.log(2))
