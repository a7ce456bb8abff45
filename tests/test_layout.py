"""The package's shape, checked from its source: no import circle, no module reading another's
private names, the HTTP layer free of JAX, data flowing model -> inference -> apps, converters
and benchmarks standing on the installed package."""

import ast
import os
import subprocess
import sys

from tests.conftest import ROOT

PACKAGE = os.path.join(ROOT, "llama2_jax")
# NamedTuple's public methods start with an underscore.
PUBLIC_UNDERSCORE = {"_replace", "_asdict", "_fields", "_make"}


def modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def imports(path: str, known: dict[str, str]) -> set[str]:
    """The package's modules `path` imports (at the top or inside functions)."""
    deps = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llama2_jax"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                deps.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name.startswith("llama2_jax")}
    return deps


def test_the_import_graph_has_no_circle():
    known = modules()
    graph = {m: imports(p, known) - {m} for m, p in known.items()}
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done or m not in graph:
            return
        path.append(m)
        for d in sorted(graph[m]):
            # a package's __init__ only re-exports (lazily): importing it runs nothing else
            if d != "llama2_jax":
                visit(d)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_layers_import_only_what_is_below_them():
    """model knows nothing above it; inference knows no app; training knows no app."""
    below = {"llama2_jax.model": ("llama2_jax.model",),
             "llama2_jax.inference": ("llama2_jax.model", "llama2_jax.inference",
                                      "llama2_jax.tokenizer", "llama2_jax.distributed"),
             "llama2_jax.training": ("llama2_jax.model", "llama2_jax.training",
                                     "llama2_jax.distributed", "llama2_jax.tokenizer")}
    known = modules()
    for m, p in known.items():
        for layer, allowed in below.items():
            if m.startswith(layer + "."):
                bad = [d for d in imports(p, known) if not d.startswith(allowed)]
                assert not bad, f"{m} imports {bad}: above its layer ({layer})"


def test_no_module_reads_another_modules_private_names():
    found = []
    known = modules()
    for m, p in known.items():
        for node in ast.walk(ast.parse(open(p).read())):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("llama2_jax"):
                found += [f"{m}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_")]
            elif (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                  and not node.attr.startswith("__") and node.attr not in PUBLIC_UNDERSCORE
                  and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found.append(f"{m}: {ast.unparse(node)}")
    assert not found, found


def test_the_http_layer_and_request_settings_import_no_jax():
    code = ("import sys, llama2_jax.serve.api, llama2_jax.serve.schemas, "
            "llama2_jax.inference.params; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.strip() == "[]", out


def test_converters_and_benchmarks_stand_on_the_installed_package():
    for folder in ("convert",):
        for f in os.listdir(os.path.join(ROOT, folder)):
            if f.endswith(".py"):
                assert "sys.path" not in open(os.path.join(ROOT, folder, f)).read(), f
    for f in os.listdir(os.path.join(ROOT, "benchmarks")):
        if f.endswith(".py"):
            tree = ast.parse(open(os.path.join(ROOT, "benchmarks", f)).read())
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                        [a.name for a in node.names]
                    assert not any(n.split(".")[0] == "tests" for n in names), \
                        f"benchmarks/{f} imports the tests"


def test_scripts_import_only_names_the_package_has():
    """Benchmarks, converters and tests name what exists (a refactor that drops a name fails
    here, not in a benchmark run weeks later)."""
    import importlib
    missing = []
    for folder in ("benchmarks", "convert", "tests"):
        for f in sorted(os.listdir(os.path.join(ROOT, folder))):
            if not f.endswith(".py"):
                continue
            tree = ast.parse(open(os.path.join(ROOT, folder, f)).read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                        "llama2_jax"):
                    module = importlib.import_module(node.module)
                    missing += [f"{folder}/{f}: {node.module}.{a.name}" for a in node.names
                                if not hasattr(module, a.name) and not (
                                    hasattr(module, "__path__") and importlib.util.find_spec(
                                        f"{node.module}.{a.name}"))]
    assert not missing, missing


def test_modules_stay_readable():
    long = {m: n for m, p in modules().items() if (n := len(open(p).read().splitlines())) > 450}
    assert not long, f"modules over 450 lines (split them by concern): {long}"
