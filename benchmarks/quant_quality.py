"""How close int8 / FP8 / int4 weights keep a trained model to itself, against an independent
floor.

  python benchmarks/quant_quality.py --checkpoint_dir=~/.cache/llama2_jax/demo/final
  python benchmarks/quant_quality.py                       # trains its own tiny model first

For each method (llama2_jax's int8 and fp8, `llama2_jax.quantize_model`) it runs the model on
fixed prompts (teacher forcing: the next-token distribution at every position) and reports,
against the same model unquantized (fp32):
  KL        mean KL(p_full || p_quant) over all positions, in nats
  top-1     share of positions whose most likely next token is unchanged
The floor is the same measurement done independently in PyTorch: the unquantized weights copied
into a Hugging Face `LlamaForCausalLM` (convert/mapping.py's jax_to_hf), every projection
(q/k/v/o, gate/up/down, lm_head) quantized and dequantized in torch with plain symmetric
per-output-channel absmax (int8: round(w / s) with s = max|w| / 127; fp8: cast of w / s to
torch.float8_e4m3fn with s = max|w| / 448; int4: groups of g consecutive inputs of each row,
s = max|w| / 7 per group, round(w / s) clamped to [-8, 7], g the largest divisor up to 128 of
the row's inputs, of the head size for o_proj whose groups stay within a head), compared with
the fp32 HF model's own logits.
"fp8-native" is the FP8 x FP8 path of GPUs with FP8 matmuls (`native_fp8=True`: the
activations cast to e4m3 too, a scale per token), emulated here on CPU, against the same
weight-only floor. The script also counts the 8-bit codes that differ between the two sides
(the scales may
differ in their last bit: XLA:CPU's float division is not always correctly rounded).

The KV cache in 8 bits (int8 / fp8 with a scale per position and KV head,
`kv_quantization`) is measured the same way against the full-precision cache: each prompt fed
one token at a time through a cache of each format (every next-token distribution then reads
all earlier keys and values from the cache, as decoding does), KL and top-1 of the 8-bit
cache's distributions against the float32 cache's.

Without --checkpoint_dir it trains a tiny Llama (vocab 32000, dim 128, 2 layers) for --steps
AdamW steps on this repository's README.md (tests/data/tokenizer.model) and measures on text
it was not trained on.
"""

from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import llama2_jax  # noqa: E402
from convert import mapping  # noqa: E402
from llama2_jax.model import checkpoint, quant  # noqa: E402
from llama2_jax.model.config import ModelConfig  # noqa: E402
from llama2_jax.tokenizer import Tokenizer  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint_dir", "", "Trained llama2_jax checkpoint ('' = train one).")
flags.DEFINE_string("tokenizer", os.path.join(ROOT, "tests", "data", "tokenizer.model"),
                    "Tokenizer when the checkpoint has none (or for the trained model).")
flags.DEFINE_integer("steps", 300, "Training steps of the self-trained model.")
flags.DEFINE_string("save_trained", "", "Save the self-trained model here (a checkpoint for "
                    "--checkpoint_dir next time).")
flags.DEFINE_string("json", "", "Also write the results to this JSON file.")

# Fixed prompts: plain English not in README.md (the self-trained model's training text).
PROMPTS = [
    "The llama is a domesticated South American camelid, widely used as a meat and pack "
    "animal by Andean cultures since the pre-Columbian era.",
    "To convert the weights, run the converter once and point the chat app at the output "
    "directory; every field of the config can be overridden on the command line.",
    "Quantization stores each weight in eight bits with one scale per output channel, so the "
    "model needs half the memory of bfloat16 and a quarter of float32.",
    "[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nWhat is a transformer? [/INST]",
    "Tests never touch the network; numerics are checked against an independent implementation "
    "on tiny random models, and eight simulated devices must give the same logits as one.",
    "def quantize(w, method):\n    scale = abs(w).max(axis=0) / 127\n    return round(w / scale)",
]
TINY_TRAINED = ModelConfig(vocab_size=32000, dim=128, n_layers=2, n_heads=4, n_kv_heads=4,
                           ffn_dim=352, max_seq_len=256)


def train_tiny(tok: Tokenizer, steps: int, seed: int = 0):
    """A tiny Llama trained with AdamW on README.md (random 64-token crops, batch 8)."""
    import optax
    from flax import nnx

    with open(os.path.join(ROOT, "README.md")) as f:
        ids = np.asarray(tok.encode(f.read(), bos=True, eos=False), np.int32)
    model = checkpoint.random_model(TINY_TRAINED, seed=seed)
    graphdef, state = nnx.split(model)
    params = checkpoint.params_of(model)
    warmup = min(20, steps // 2)
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, 3e-3, warmup, steps),
                     weight_decay=0.01)
    opt = tx.init(params)
    t_len, batch = 64, 8
    positions = jnp.broadcast_to(jnp.arange(t_len, dtype=jnp.int32), (batch, t_len))

    def loss_fn(p, tokens):
        nnx.replace_by_pure_dict(state, p)
        logits, _ = nnx.merge(graphdef, state)(tokens[:, :-1], positions)
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

    @jax.jit
    def step(p, opt, tokens):
        loss, g = jax.value_and_grad(loss_fn)(p, tokens)
        updates, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    rng = np.random.default_rng(seed)
    for i in range(steps):
        starts = rng.integers(0, len(ids) - t_len - 1, batch)
        tokens = jnp.asarray(np.stack([ids[s:s + t_len + 1] for s in starts]))
        params, opt, loss = step(params, opt, tokens)
        if i % 100 == 0 or i == steps - 1:
            print(f"train step {i}: loss {float(loss):.3f}", flush=True)
    return checkpoint.from_params(TINY_TRAINED, jax.tree.map(np.asarray, params)), len(ids)


def cached_logits(model, prompt, kv: str) -> np.ndarray:
    """Next-token logits of `prompt` fed a token at a time through a cache in format `kv`."""
    from llama2_jax.model import kv_cache
    cfg = model.config
    cache = kv_cache.init_blocks(cfg.n_layers, (1,), (cfg.max_seq_len,), cfg.n_kv_heads,
                                 cfg.head_dim, cfg.compute_dtype, kv)
    step = jax.jit(lambda c, t, p: model(t, p, c))
    out = []
    for i, token in enumerate(prompt):
        logits, cache = step(cache, jnp.asarray([[token]], jnp.int32),
                             jnp.asarray([[i]], jnp.int32))
        out.append(np.asarray(logits[0, 0]))
    return np.stack(out)


def kl_top1(full: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """Mean KL(softmax(full) || softmax(other)) and top-1 agreement over rows of logits."""
    lp = jax.nn.log_softmax(jnp.asarray(full, jnp.float32), -1)
    lq = jax.nn.log_softmax(jnp.asarray(other, jnp.float32), -1)
    kl = jnp.sum(jnp.exp(lp) * (lp - lq), -1)
    return float(kl.mean()), float((full.argmax(-1) == other.argmax(-1)).mean())


# -- the independent floor: PyTorch + transformers -----------------------------------------------
HF_QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "lm_head")


def hf_state(params: dict, cfg) -> dict:
    """HF state dict (numpy, [out, in]) of llama2_jax params."""
    state = {}
    for path, layer, name in mapping.hf_names(cfg):
        w = quant.get_path(params, path)
        w = np.asarray(w if layer is None else w[layer], np.float32)
        state[name] = np.ascontiguousarray(mapping.jax_to_hf(path, w, cfg))
    return state


def torch_group(n: int) -> int:
    """int4's group for n inputs (as the docstring says, written here again)."""
    for g in range(min(128, n), 0, -1):
        if n % g == 0:
            return g if 8 * g >= min(128, n) else n


def torch_absmax(w, method: str, group: int = 0):
    """Plain per-output-channel (row of torch's [out, in]) absmax quantization, or per group
    of `group` inputs of a row (int4): the codes (as float32) and the dequantized weight."""
    import torch
    if method == "int4":
        out, n = w.shape
        wg = w.reshape(out, n // group, group)
        amax = wg.abs().amax(dim=2, keepdim=True)
        s = torch.where(amax > 0, amax / 7, torch.ones_like(amax))
        q = torch.clamp(torch.round(wg / s), -8, 7)
        return q.reshape(out, n), (q * s).reshape(out, n)
    amax = w.abs().amax(dim=1, keepdim=True)
    if method == "int8":
        s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        q = torch.clamp(torch.round(w / s), -127, 127)
    else:
        s = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
        q = (w / s).to(torch.float8_e4m3fn).to(torch.float32)
    return q, q * s


def hf_logits_of(state: dict, cfg, prompts) -> np.ndarray:
    import torch
    from transformers import LlamaForCausalLM

    from transformers import LlamaConfig
    model = LlamaForCausalLM(LlamaConfig(**mapping.hf_config_dict(cfg, "float32"))).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    with torch.no_grad():
        return np.concatenate([model(torch.as_tensor([p])).logits[0].numpy() for p in prompts])


def torch_floor(params: dict, cfg, prompts, method: str, full_hf: np.ndarray):
    """((KL, top-1) of the torch-quantized HF model vs `full_hf`, {name: 8-bit codes})."""
    import torch
    deq, codes = {}, {}
    for k, v in hf_state(params, cfg).items():
        deq[k] = v
        if k.split(".")[-2] in HF_QUANTIZED:
            n = cfg.head_dim if k.split(".")[-2] == "o_proj" else v.shape[1]
            q, w = torch_absmax(torch.from_numpy(v), method, torch_group(n))
            codes[k], deq[k] = q.numpy(), w.numpy()
    return kl_top1(full_hf, hf_logits_of(deq, cfg, prompts)), codes


def main(argv):
    del argv
    t0 = time.perf_counter()
    if FLAGS.checkpoint_dir:
        directory = os.path.expanduser(FLAGS.checkpoint_dir)
        model = llama2_jax.load(directory, dtype="float32", quantization="none")
        tok = Tokenizer(checkpoint.tokenizer_path(directory) or FLAGS.tokenizer)
        source = directory
    else:
        tok = Tokenizer(FLAGS.tokenizer)
        model, n_train = train_tiny(tok, FLAGS.steps)
        if FLAGS.save_trained:
            checkpoint.save(FLAGS.save_trained, model, tokenizer_path=FLAGS.tokenizer,
                            overwrite=True)
        source = (f"self-trained tiny Llama, {FLAGS.steps} AdamW steps on README.md "
                  f"({n_train} tokens)")
    cfg = model.config
    prompts = [tok.encode(p, bos=True, eos=False) for p in PROMPTS]
    n_pos = sum(len(p) for p in prompts)
    full = np.concatenate([llama2_jax.forward(model, p) for p in prompts])
    params = jax.tree.map(np.asarray, checkpoint.params_of(model))
    full_hf = hf_logits_of(hf_state(params, cfg), cfg, prompts)
    results = {"source": source, "config": cfg.to_dict(), "positions": n_pos,
               "full_vs_hf_max_abs_logit_diff": float(np.abs(full - full_hf).max()),
               "methods": {}}
    for name, method, native in (("int8", "int8", False), ("fp8", "fp8", False),
                                 ("fp8-native", "fp8", True), ("int4", "int4", False)):
        # native: the GPU path (FP8 x FP8), emulated on CPU
        qmodel = quant.quantize_model(model, method, native_fp8=native)
        ours = np.concatenate([llama2_jax.forward(qmodel, p) for p in prompts])
        (floor_kl, floor_top1), torch_codes = torch_floor(params, cfg, prompts, method,
                                                          full_hf)
        # Our codes in HF's layout, to count those that land on another grid point.
        our_codes = hf_state(quant.map_params(
            lambda _, w: np.asarray(w.codes(), np.float32) if isinstance(w, quant.QArray) else w,
            checkpoint.params_of(qmodel)), cfg)
        differ = sum(int((our_codes[k] != torch_codes[k]).sum()) for k in torch_codes)
        n_codes = sum(v.size for v in torch_codes.values())
        kl, top1 = kl_top1(full, ours)
        results["methods"][name] = {
            "kl": kl, "top1": top1, "floor_kl": floor_kl, "floor_top1": floor_top1,
            "kl_vs_floor": kl / floor_kl, "codes_differing_from_torch": differ,
            "codes": n_codes,
            "weight_bytes": quant.weight_bytes(qmodel)}
    results["weight_bytes_full"] = quant.weight_bytes(model)
    base = np.concatenate([cached_logits(model, p, "none") for p in prompts])
    results["kv_cache"] = {}
    for kv in ("int8", "fp8"):
        kl, top1 = kl_top1(base, np.concatenate([cached_logits(model, p, kv) for p in prompts]))
        results["kv_cache"][kv] = {"kl": kl, "top1": top1}
    results["seconds"] = time.perf_counter() - t0
    print(f"\n{source}: {n_pos} next-token distributions on {len(prompts)} fixed prompts; "
          f"fp32 llama2_jax vs fp32 HF max |logit diff| "
          f"{results['full_vs_hf_max_abs_logit_diff']:.2e}")
    print("| method | KL(full \\|\\| quant), nats | top-1 agreement | floor KL (torch absmax) | "
          "floor top-1 | KL / floor | codes != torch's | weight bytes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for method, r in results["methods"].items():
        print(f"| {method} | {r['kl']:.3e} | {100 * r['top1']:.1f}% | {r['floor_kl']:.3e} | "
              f"{100 * r['floor_top1']:.1f}% | {r['kl_vs_floor']:.3f} | "
              f"{r['codes_differing_from_torch']} of {r['codes']} | "
              f"{r['weight_bytes'] / 1e6:.2f} MB |")
    print("\n| KV cache | KL(float32 cache \\|\\| 8-bit cache), nats | top-1 agreement |")
    print("|---|---:|---:|")
    for kv, r in results["kv_cache"].items():
        print(f"| {kv} | {r['kl']:.3e} | {100 * r['top1']:.1f}% |")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
