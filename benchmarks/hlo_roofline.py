"""A roofline of a compiled XLA program, read from its optimized HLO text.

    report = roofline(compiled.as_text(), peak_flops=989e12, bandwidth=3.35e12,
                      kernel_flops=lambda name, operands: ...)

Every kernel the program launches (a fusion, a custom call, a copy, a collective) gets a lower
bound on its time, the larger of

    FLOPs / peak_flops          (the dots inside a fusion: 2 x result size x contracted size)
    bytes / bandwidth           (its operands read once and its result written once)
    launch_s                    (no kernel finishes faster than a launch)

and the program's bound is their sum (one stream, no overlap; `seconds_overlapped` lets the
collectives, which XLA runs asynchronously, hide behind the rest). The bound is what the hardware
could do at best with XLA's fusion decisions as they are, so a large share of memory-bound time
points at what fusion left on the table, and `model FLOPs / (bound x peak)` is a ceiling on MFU.

Bytes are refined where reading a whole operand would overstate the traffic: a loop fusion reads
at most one element of each operand per output element; a fusion operand whose every use ends,
through elementwise ops, in slices / dynamic slices / gathers counts what those read; a fusion
whose root updates a buffer in place (dynamic-update-slice, scatter) writes the update (at most
the buffer's size: a scatter-add into a small table), not the whole buffer. Custom calls (Pallas
kernels, on Triton or Mosaic GPU) report no FLOPs in HLO: `kernel_flops(name, operand types)` supplies them
(benchmarks/gpu_targets.py knows this repo's), and `kernel_bytes(name, operand types, result
type)` may replace the whole-operands count for a kernel that touches only part of an operand. Loops count their body once and are listed in
`warnings`. Not counted: the CUDA-core work of elementwise ops (a kernel heavy in it, like HSTU
attention's SiLU and bias, can be slower than its bound), and re-reads that miss the L2 cache.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
            "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
FREE = {"parameter", "constant", "get-tuple-element", "bitcast", "tuple", "after-all", "opt-barrier",
        "partition-id", "replica-id", "iota"}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all", "collective-broadcast")
READS_PART = ("gather", "dynamic-slice", "slice")
# One output element from the same element of each operand: a fusion computes them only where a
# later slice or gather asks, so a parameter read through them reads what the slice reads.
ELEMENTWISE = {"add", "subtract", "multiply", "divide", "negate", "exponential", "exponential-minus-one", "log",
               "log-plus-one", "tanh", "logistic", "maximum", "minimum", "select", "compare", "convert", "bitcast",
               "reshape", "abs", "rsqrt", "sqrt", "cbrt", "power", "and", "or", "not", "xor", "clamp", "floor", "ceil",
               "round-nearest-even", "round-nearest-afz", "sign", "cosine", "sine", "erf", "copy", "is-finite"}
WRITES_PART = ("dynamic-update-slice", "scatter")


def shape_dims(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """[(dtype, dims)] of every array in a type string: 'bf16[2,3]{1,0}' or a tuple of them."""
    return [(dt, tuple(int(x) for x in dims.split(",") if x)) for dt, dims in ARRAY.findall(text)
            if dt in ITEMSIZE]


def type_bytes(text: str) -> float:
    """Bytes of every array in a type string."""
    return sum(ITEMSIZE[dt] * math.prod(dims) for dt, dims in shape_dims(text))


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start] ('(' or '{')."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    i = start
    quote = False
    while i < len(text):
        c = text[i]
        if c == '"' and text[i - 1] != "\\":
            quote = not quote
        elif not quote:
            if c in pairs:
                stack.append(pairs[c])
            elif stack and c == stack[-1]:
                stack.pop()
                if not stack:
                    return i + 1
        i += 1
    return len(text)


@dataclasses.dataclass
class Instruction:
    name: str
    type: str         # the result type text
    opcode: str
    operands: list[str]
    attrs: str        # everything after the operand list
    raw: str = ""     # the operand list as written (a parameter's index)
    is_root: bool = False

    @property
    def bytes(self) -> float:
        return type_bytes(self.type)

    def attr(self, key: str) -> str | None:
        m = re.search(rf"\b{key}=(%?[\w.\-]+|\{{[^}}]*\}})", self.attrs)
        return m.group(1) if m else None

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.attrs)
        return m.group(1) if m else ""


def parse_instruction(line: str) -> Instruction | None:
    m = INSTRUCTION.match(line)
    if not m:
        return None
    name, rest = m.group(2), m.group(3)
    if rest.startswith("("):
        end = _balanced(rest, 0)
        type_text, rest = rest[:end], rest[end:].lstrip()
    else:
        type_text, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-$]+)\(", rest)
    if not op:
        return None
    end = _balanced(rest, len(op.group(1)))
    operand_text = re.sub(r"/\*.*?\*/", "", rest[len(op.group(1)) + 1:end - 1])
    operands = re.findall(r"%([\w.\-]+)", operand_text)
    return Instruction(name, type_text, op.group(1), operands, rest[end:], operand_text.strip(), bool(m.group(1)))


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """({computation name: instructions}, the entry computation's name)."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = HEADER.match(line)
        if header:
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        if current is not None:
            inst = parse_instruction(line)
            if inst is not None:
                computations[current].append(inst)
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def dot_flops(inst: Instruction, shapes: dict[str, str]) -> float:
    """2 x result elements x contracted elements of a dot."""
    result = shape_dims(inst.type)
    lhs = shape_dims(shapes.get(inst.operands[0], "")) if inst.operands else []
    contracting = inst.attr("lhs_contracting_dims") or "{}"
    dims = [int(x) for x in contracting.strip("{}").split(",") if x.strip()]
    if not result or not lhs:
        return 0.0
    return 2.0 * math.prod(result[0][1]) * math.prod(lhs[0][1][d] for d in dims)


@dataclasses.dataclass
class Kernel:
    name: str
    kind: str          # matmul | pallas | memory | gather/scatter | copy | collective
    flops: float
    bytes: float
    seconds: float
    bound: str         # compute | memory | launch
    op_name: str       # the JAX primitive path, e.g. jit(train_step)/transpose(jvp())/dot_general
    source: str        # the project's innermost source line, e.g. scaling/models/hstu.py:145 HSTUBlock.project


def stack_frames(text: str) -> dict[int, tuple[str, int, str, int]]:
    """{frame id: (file, line, function, parent id or 0)} from the tables HLO text opens with
    (FileNames, FunctionNames, FileLocations, StackFrames). A frame's printed parent_frame_id is
    the parent's id + 1 (1 = no parent)."""
    tables: dict[str, dict[int, str]] = {}
    current = None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
            continue
        m = re.match(r"^(\d+) (.*)$", line)
        if current is None or not m:
            if current is not None and line.strip():
                current = None
            continue
        current[int(m.group(1))] = m.group(2)
    files = {k: v.strip('"') for k, v in tables.get("FileNames", {}).items()}
    functions = {k: v.strip('"') for k, v in tables.get("FunctionNames", {}).items()}

    def field(text, key):
        m = re.search(rf"\b{key}=(\d+)", text)
        return int(m.group(1)) if m else 0

    frames = {}
    for fid, text in tables.get("StackFrames", {}).items():
        loc = tables.get("FileLocations", {}).get(field(text, "file_location_id"), "")
        frames[fid] = (files.get(field(loc, "file_name_id"), "?"), field(loc, "line"),
                       functions.get(field(loc, "function_name_id"), "?"), field(text, "parent_frame_id") - 1)
    return frames


def frame_label(frames: dict, frame_id: int, marker: str = "/scaling/") -> str:
    """'scaling/models/hstu.py:145 HSTUBlock.project': the innermost frame whose file path holds
    `marker` (the project's code, not JAX's or Flax's), or '' if none."""
    seen = set()
    while frame_id in frames and frame_id not in seen:
        seen.add(frame_id)
        file, line, function, parent = frames[frame_id]
        if marker in file:
            return f"{marker.strip('/')}/{file.split(marker, 1)[1]}:{line} {function}"
        frame_id = parent
    return ""


def _elements_read(name: str, users: dict[str, list[Instruction]], depth: int = 0) -> float | None:
    """Elements of `name` a fusion reads when every use of it, through elementwise ops, ends as the
    operand of a slice, dynamic slice or gather (what those produce); None when some use reads all."""
    use = users.get(name, [])
    if not use or depth > 64:
        return None
    total = 0.0
    for u in use:
        if u.opcode in READS_PART and u.operands[0] == name:
            total += max((math.prod(dims) for _, dims in shape_dims(u.type)), default=0)
        elif u.opcode in ELEMENTWISE:
            part = _elements_read(u.name, users, depth + 1)
            if part is None:
                return None
            total += part
        else:
            return None
    return total


class _Module:
    def __init__(self, text: str):
        self.computations, self.entry = parse_module(text)
        self.shapes = {c: {i.name: i.type for i in insts} for c, insts in self.computations.items()}
        self.frames = stack_frames(text)

    def source(self, inst: Instruction) -> str:
        m = re.search(r"stack_frame_id=(\d+)", inst.attrs)
        return frame_label(self.frames, int(m.group(1))) if m else ""

    def called(self, inst: Instruction) -> list[str]:
        names = []
        for key in ("calls", "to_apply", "body", "condition", "true_computation", "false_computation"):
            value = inst.attr(key)
            if value:
                names += [v.strip().lstrip("%") for v in value.strip("{}").split(",")]
        branches = inst.attr("branch_computations")
        if branches:
            names += [v.strip().lstrip("%") for v in branches.strip("{}").split(",")]
        return [n for n in names if n in self.computations]

    def fused_flops(self, computation: str) -> float:
        total = 0.0
        for inst in self.computations[computation]:
            if inst.opcode == "dot":
                total += dot_flops(inst, self.shapes[computation])
            for sub in self.called(inst):
                total += self.fused_flops(sub)
        return total

    def fused_opcodes(self, computation: str) -> set[str]:
        ops = set()
        for inst in self.computations[computation]:
            ops.add(inst.opcode)
            for sub in self.called(inst):
                ops |= self.fused_opcodes(sub)
        return ops

    def fusion_bytes(self, inst: Instruction, computation: str, outer: dict[str, str]) -> float:
        """Operands read + result written, with the partial-read / in-place refinements."""
        body = self.computations[computation]
        params = {i.name: int(i.raw) for i in body if i.opcode == "parameter" and i.raw.isdigit()}
        users: dict[str, list[Instruction]] = {}
        for i in body:
            for o in i.operands:
                users.setdefault(o, []).append(i)
        root = next((i for i in body if i.is_root), None)
        in_place = root is not None and root.opcode in WRITES_PART
        # A loop fusion computes each output element from at most one element of each operand
        # (elementwise, slice, broadcast, transpose), so it reads no more than its output's count.
        loop = inst.attr("kind") == "kLoop"
        out_elements = max((math.prod(dims) for _, dims in shape_dims(inst.type)), default=0)
        total = 0.0
        for pname, index in params.items():
            if index >= len(inst.operands):
                continue
            operand = outer.get(inst.operands[index], "")
            size = type_bytes(operand)
            if arrays := shape_dims(operand):
                read = _elements_read(pname, users)
                elements = min(out_elements if loop else math.inf, math.inf if read is None else read)
                size = min(size, elements * ITEMSIZE[arrays[0][0]])
            if in_place and root.operands and root.operands[0] == pname:
                size = 0.0  # the buffer updated in place is neither read nor rewritten whole
            total += size
        if in_place and len(root.operands) > 1:
            # writes: the update, but a scatter into a small buffer (a histogram) writes no more than it
            update = root.operands[2] if root.opcode == "scatter" and len(root.operands) > 2 else root.operands[1]
            total += min(type_bytes(self.shapes[computation].get(update, "")), inst.bytes)
        else:
            total += inst.bytes
        return total


def roofline(text: str, peak_flops: float, bandwidth: float, launch_s: float = 2e-6,
             kernel_flops: Callable[[str, list[str]], float] | None = None,
             collective_bandwidth: float | None = None,
             kernel_bytes: Callable[[str, list[str], str], float | None] | None = None) -> dict:
    """The per-kernel bounds of the entry computation (module docstring) and their summary."""
    module = _Module(text)
    kernels: list[Kernel] = []
    warnings: list[str] = []

    def visit(computation: str):
        shapes = module.shapes[computation]
        for inst in module.computations[computation]:
            op = inst.opcode
            if op in FREE or op.endswith("-done"):
                continue
            flops, kind, size = 0.0, "memory", inst.bytes + sum(type_bytes(shapes.get(o, "")) for o in inst.operands)
            name = inst.name
            if op in ("call", "while", "conditional", "async-start"):
                if op in ("while", "conditional"):
                    warnings.append(f"{inst.name}: a {op}; " + ("its body is counted once" if op == "while"
                                                                   else "every branch is counted"))
                for sub in module.called(inst):
                    if op != "while" or sub == inst.attr("body").lstrip("%"):
                        visit(sub)
                continue
            if op == "fusion":
                [called] = module.called(inst) or [None]
                if called is None:
                    continue
                flops = module.fused_flops(called)
                ops = module.fused_opcodes(called)
                size = module.fusion_bytes(inst, called, shapes)
                kind = ("matmul" if flops else "gather/scatter" if ops & {"gather", "scatter", "dynamic-update-slice"}
                        else "memory")
            elif op == "custom-call":
                target = re.search(r'custom_call_target="([^"]*)"', inst.attrs)
                target = target.group(1) if target else ""
                kname = re.search(r'\bname = "([^"]*)"', inst.attrs)
                if target.startswith("mosaic_gpu"):
                    # a Mosaic GPU kernel's name is in its op_name: .../NAME/mpmd_map
                    kname = re.search(r"([\w.\-]+)/mpmd_map$", inst.op_name)
                if ("triton" in target or target.startswith("mosaic_gpu")) and kname:
                    name, kind = kname.group(1), "pallas"
                    operands = [shapes.get(o, "") for o in inst.operands]
                    flops = kernel_flops(name, operands) if kernel_flops else 0.0
                    touched = kernel_bytes(name, operands, inst.type) if kernel_bytes else None
                    size = size if touched is None else touched
                elif "gemm" in target or "matmul" in target:
                    kind = "matmul"
                    lhs = shape_dims(shapes.get(inst.operands[0], "")) if inst.operands else []
                    result = shape_dims(inst.type)
                    if lhs and result:
                        # a gemm's result [.., M, N] from lhs [.., M, K]: K = lhs size / (batch x M)
                        flops = 2.0 * math.prod(result[0][1]) * math.prod(lhs[0][1]) / max(1, math.prod(result[0][1][:-1]))
                else:
                    name = target or name
            elif op in ("copy", "transpose") or op.startswith("copy-start"):
                kind = "copy"
            elif any(op.startswith(c) for c in COLLECTIVES):
                kind = "collective"
            elif op == "dot":
                kind, flops = "matmul", dot_flops(inst, shapes)
            bw = collective_bandwidth if kind == "collective" and collective_bandwidth else bandwidth
            times = {"compute": flops / peak_flops, "memory": size / bw, "launch": launch_s}
            bound = max(times, key=times.get)
            kernels.append(Kernel(name, kind, flops, size, times[bound], bound, inst.op_name, module.source(inst)))

    visit(module.entry)
    total = sum(k.seconds for k in kernels)
    by_kind = {kind: group for (kind,), group in _summed(kernels, lambda k: (k.kind,)).items()}
    for row in by_kind.values():
        del row["bound"]
        row["share"] = row["seconds"] / total if total else 0.0
    collective = by_kind.get("collective", {}).get("seconds", 0.0)
    # XLA's GPU collectives are asynchronous: at best they hide entirely behind the compute stream
    return {"seconds": total, "seconds_overlapped": max(total - collective, collective),
            "flops": sum(k.flops for k in kernels), "bytes": sum(k.bytes for k in kernels),
            "kernels": kernels, "by_kind": by_kind, "warnings": warnings}


def _summed(kernels: list[Kernel], key: Callable[[Kernel], tuple]) -> dict[tuple, dict]:
    """{key: launches, seconds, FLOPs, bytes summed and a count of each bound} over the kernels."""
    groups: dict[tuple, dict] = {}
    for k in kernels:
        g = groups.setdefault(key(k), {"kernels": 0, "seconds": 0.0, "flops": 0.0, "bytes": 0.0, "bound": {}})
        g["kernels"] += 1
        g["seconds"] += k.seconds
        g["flops"] += k.flops
        g["bytes"] += k.bytes
        g["bound"][k.bound] = g["bound"].get(k.bound, 0) + 1
    return groups


def top_sources(kernels: list[Kernel], n: int = 12) -> list[dict]:
    """The `n` largest time bounds summed by (kind, source line, primitive): where the time goes."""

    def key(k: Kernel) -> tuple[str, str, str]:
        return k.kind, k.source, k.op_name.rsplit("/", 1)[-1] if k.op_name else re.sub(r"\.\d+$", "", k.name)

    groups = [{"kind": kind, "source": source, "primitive": primitive, **g}
              for (kind, source, primitive), g in _summed(kernels, key).items()]
    return sorted(groups, key=lambda g: -g["seconds"])[:n]
