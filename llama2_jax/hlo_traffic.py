"""Memory traffic of a compiled XLA program, read from its HLO text (`compiled.as_text()`).

XLA's cost analysis ("bytes accessed") adds every instruction's operands and outputs in any
memory: on a TPU a weight prefetched into on-chip memory (an async copy into memory space S(1))
and then read by its matmul counts three times. `hbm_bytes` counts what crosses HBM: operands
and outputs in the default memory space, the on-chip side of a prefetch once, an in-place
update (a fusion whose output aliases an operand) without the buffer it updates, and a fusion
that only slices an operand (a scanned layer's weights, its cache) by the slices it reads. A
loop's body is counted once, as cost analysis does (llama2_jax.aot adds the other layers).
"""

from __future__ import annotations

import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*?)\)(.*)$")
_SKIP = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
         "conditional", "call", "after-all", "partition-id", "replica-id", "iota"}


def _arrays(shape: str) -> list[tuple[int, bool]]:
    """(bytes, in HBM) of each array in an HLO shape string."""
    out = []
    for dtype, dims, layout in _ARRAY.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        out.append((n * _DTYPE_BYTES[dtype], not re.search(r"S\([1-9]\d*\)", layout or "")))
    return out


_PASS = {"copy", "convert", "bitcast", "reshape", "transpose", "bitcast-convert"}


def _sliced_params(comps: dict, name: str) -> dict[int, int]:
    """{parameter number: bytes read} for a fused computation's parameters that it reads only
    through slices (dynamic-slice, slice, gather; after copies, converts and layout changes,
    in nested fusions too): the slices' bytes, not the parameter's."""
    params, users, sizes, elements = {}, {}, {}, {}
    for line in comps.get(name, []):
        m = _INSTR.match(line)
        if not m:
            continue
        out, shape, op, args, rest = m.groups()
        sizes[out] = sum(b for b, _ in _arrays(shape))
        elements[out] = shape.split("{")[0].split("]")[0]  # dtype-free dims: same => 1:1
        elements[out] = elements[out][elements[out].find("["):]
        if op == "parameter":
            params[out] = int(args)
            continue
        nested = re.search(r"calls=%([\w.\-]+)", rest) if op == "fusion" else None
        operands = re.findall(r"%([\w.\-]+)", args)
        for k, arg in enumerate(operands):
            users.setdefault(arg, []).append(
                (op, out, nested.group(1) if nested else None, k, len(operands)))

    def read(value: str, ratio: float) -> float | None:
        """Bytes of the parameter read through `value` (ratio: its bytes per value byte)."""
        total = 0.0
        for op, out, nested, k, n in users.get(value, []):
            inner = _sliced_params(comps, nested) if nested else {}
            if op in ("dynamic-slice", "slice", "gather"):
                part = sizes[out] * ratio
            elif op == "fusion" and k in inner:
                part = inner[k] * ratio
            elif op in _PASS or (op == "fusion" and n == 1 and elements[out] == elements[value]):
                # a copy, conversion or layout change of the whole value: follow it
                part = read(out, ratio * sizes[value] / max(sizes[out], 1))
            else:
                part = None
            if part is None:
                return None
            total += part
        return total

    found = {}
    for pname, number in params.items():
        got = read(pname, 1.0)
        if got is not None and pname in users:
            found[number] = int(got)
    return found


def hbm_bytes(hlo: str) -> int:
    """Bytes a compiled program (its text) reads and writes in HBM (see above)."""
    comps, entry, cur = {}, None, None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY )?%([\w.\-]+) .*\{$", line)
        if head:
            cur = comps.setdefault(head.group(2), [])
            entry = head.group(2) if head.group(1) else entry
        elif cur is not None and line.strip() != "}":
            cur.append(line)
    total, seen = 0, set()

    def visit(name: str) -> None:
        nonlocal total
        if name in seen or name not in comps:
            return
        seen.add(name)
        shapes = {}
        for line in comps[name]:
            m = _INSTR.match(line)
            if not m:
                continue
            out, shape, op, args, rest = m.group(1), m.group(2), m.group(3), m.group(4), m.group(5)
            shapes[out] = shape
            for called in re.findall(r"(?:body|condition|to_apply|branch_computations=\{)"
                                     r"[=]?%([\w.\-]+)", rest) if op in (
                                         "while", "conditional", "call") else ():
                visit(called)
            if op == "conditional":
                for branch in re.findall(r"%([\w.\-]+)", rest.split("branch_computations=")[-1]
                                         .split("}")[0]):
                    visit(branch)
            if op in _SKIP or op.endswith("-done"):
                continue
            if op.endswith("-start"):  # an async move: its on-chip side once
                total += sum(b for b, hbm in _arrays(shape) if not hbm)
                continue
            alias = re.search(r'"aliasing_operands":\{"lists":\[\{"indices":\[([^\]]*)\]', rest)
            aliased = {int(i) for i in re.findall(r"\d+", alias.group(1))} if alias else set()
            operands = re.findall(r"%([\w.\-]+)", args)
            fused = re.search(r"calls=%([\w.\-]+)", rest) if op == "fusion" else None
            sliced = _sliced_params(comps, fused.group(1)) if fused else {}
            for i, arg in enumerate(operands):
                if i in aliased:
                    continue
                if i in sliced:  # the fusion reads slices of it (a scanned layer's)
                    if any(hbm for _, hbm in _arrays(shapes.get(arg, ""))):
                        total += sliced[i]
                    continue
                total += sum(b for b, hbm in _arrays(shapes.get(arg, "")) if hbm)
            if not aliased:
                total += sum(b for b, hbm in _arrays(shape) if hbm)

    visit(entry)
    return total
