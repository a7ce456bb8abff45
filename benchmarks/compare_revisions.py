"""One benchmark, two revisions of this repository, one machine, one run: before / after.

  python benchmarks/compare_revisions.py --before=f0daa92 --bench=bench_inference -- --reps=3
  python benchmarks/compare_revisions.py --before=f0daa92 --bench=bench_serve \
      -- --sides=ours --concurrency=1,4,16,64 --mixed_requests=0

`--before` is checked out into a temporary git worktree; the benchmark script runs there (its
own `benchmarks/<bench>.py`, importing its own `llama2_jax`) and here (the working tree),
alternating for `--rounds` rounds so that drift of a shared machine hits both alike. Each run
writes its JSON; the medians of the figures below are printed side by side with after/before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (label, path into the benchmark's JSON) of the figures compared
FIGURES = {
    "bench_inference": [
        ("decode tok/s, batch 1 (Engine.stream: generate, chat)",
         ("summary", "llama2_jax", "decode_tok_s")),
        ("decode step ms, batch 1", ("summary", "llama2_jax", "step_ms")),
        ("prefill tok/s, 128 tokens", ("summary", "llama2_jax", "prefill_tok_s")),
        ("TTFT warm ms", ("summary", "llama2_jax", "ttft_warm_ms")),
        ("TTFT cold ms (compiles)", ("summary", "llama2_jax", "ttft_cold_ms")),
        ("16-slot step ms, 1 row greedy", ("summary", "sampled_vs_greedy", "1", "greedy",
                                           "step_ms")),
        ("16-slot step ms, 16 rows greedy", ("summary", "sampled_vs_greedy", "16", "greedy",
                                             "step_ms")),
        ("16-slot step ms, 16 rows top_p 0.9", ("summary", "sampled_vs_greedy", "16",
                                                "top_p 0.9", "step_ms")),
        ("transformers decode tok/s (same run; drift control)",
         ("summary", "transformers", "decode_tok_s")),
    ],
    "bench_serve": [(f"{c} clients, output tok/s", ("levels", str(c), "ours", "tok_s"))
                    for c in (1, 4, 16, 64)]
    + [(f"{c} clients, TTFT p50 ms", ("levels", str(c), "ours", "ttft_p50_ms"))
       for c in (1, 4, 16, 64)]
    + [(f"{c} clients, ITL p50 ms", ("levels", str(c), "ours", "itl_p50_ms"))
       for c in (1, 4, 16, 64)]
    + [("compiles after warm-up", ("compiles_after_runs",)),
       ("compiles at ready", ("compiles_at_ready",))],
}


def dig(tree, path):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def run(tree: str, bench: str, args: list[str], out: str) -> dict:
    env = {**os.environ, "PYTHONPATH": tree}
    cmd = [sys.executable, os.path.join(tree, "benchmarks", f"{bench}.py"), f"--json={out}",
           *args]
    print(f"$ (cd {tree}) {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=tree, env=env, check=True)
    with open(out) as f:
        return json.load(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="git revision of the 'before' side")
    p.add_argument("--bench", required=True, choices=sorted(FIGURES))
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", default="", help="also write the figures here")
    p.add_argument("args", nargs="*", help="after --: the benchmark's own flags")
    a = p.parse_args()
    results = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        before = os.path.join(tmp, "before")
        subprocess.run(["git", "worktree", "add", "--detach", before, a.before], cwd=ROOT,
                       check=True, capture_output=True)
        try:
            for r in range(a.rounds):
                sides = [("before", before), ("after", ROOT)]
                for name, tree in sides if r % 2 == 0 else sides[::-1]:
                    out = os.path.join(tmp, f"{name}-{r}.json")
                    results[name].append(run(tree, a.bench, a.args, out))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", before], cwd=ROOT,
                           check=False, capture_output=True)
    rows = []
    print(f"\n| {a.bench} {' '.join(a.args)} | before ({a.before}) | after | after / before |")
    print("|---|---:|---:|---:|")
    for label, path in FIGURES[a.bench]:
        vals = {k: [v for v in (dig(x, path) for x in xs) if v is not None]
                for k, xs in results.items()}
        if not vals["before"] or not vals["after"]:
            continue
        b, f = statistics.median(vals["before"]), statistics.median(vals["after"])
        rows.append(dict(figure=label, before=b, after=f, ratio=f / b if b else None))
        ratio = f"{f / b:.2f}" if b else "-"
        print(f"| {label} | {b:.4g} | {f:.4g} | {ratio} |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"before": a.before, "bench": a.bench, "args": a.args, "rows": rows,
                       "raw": results}, fh, indent=1)


if __name__ == "__main__":
    main()
