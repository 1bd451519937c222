"""FLOPs and bytes of a compiled XLA program, counting every loop iteration.

XLA's `cost_analysis()` counts the body of a while loop once, whatever its trip count: a train
step whose layers run under `nnx.scan` and whose micro-batches run under `lax.scan` reports the
FLOPs of one layer of one micro-batch. `loop_aware_cost(hlo_text)` reads the optimised HLO
(`compiled.as_text()`) instead and weighs every instruction by the trip counts of the loops
around it:

- FLOPs: `2 * output elements * contracted size` of every `dot` and `convolution` (the matmuls,
  which are nearly all of a transformer's FLOPs; elementwise work is left out), plus the
  `"flops"` a Pallas (Mosaic) custom call states in its cost estimate, where it states one.
- bytes: operand + output bytes of every instruction at the top level of a computation
  (fusions count as one instruction, as XLA's cost analysis counts them), parameters, tuples,
  constants and bitcasts excluded: an estimate of HBM traffic.

A loop's trip count is read from its condition (`counter < constant`, the form `lax.scan` and
`lax.fori_loop` lower to, counting from 0); a loop of another form counts once. Of a
conditional only the cheapest branch counts (one runs; the models' costlier branches are
fallbacks, e.g. the Qwen vision tower's dense attention for inputs that break the static bounds
of its blocked one). The memory analysis, by contrast, holds every branch's buffers.
"""

from __future__ import annotations

import dataclasses
import re

_DTYPE_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2,
    "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
    "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(.*\) -> .* \{$")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
_NOT_TRAFFIC = {"parameter", "tuple", "get-tuple-element", "constant", "bitcast", "while"}
_NOT_TRAFFIC |= {"conditional", "call", "after-all", "partition-id", "replica-id"}


@dataclasses.dataclass
class _Instruction:
    name: str
    shape: str  # the result type text, e.g. "bf16[4,512]{1,0}" or a tuple
    opcode: str
    rest: str  # operands and attributes
    root: bool = False


def _arrays(text: str) -> list[tuple[str, list[int]]]:
    return [(d, [int(s) for s in dims.split(",") if s]) for d, dims in _ARRAY.findall(text)]


def _bytes(text: str) -> int:
    total = 0
    for dtype, dims in _arrays(text):
        count = 1
        for size in dims:
            count *= size
        total += count * _DTYPE_BYTES[dtype]
    return total


def _elements(shape: str) -> int:
    arrays = _arrays(shape)
    count = 1
    for size in arrays[0][1] if arrays else []:
        count *= size
    return count


def _parse(hlo_text: str) -> tuple[dict[str, list[_Instruction]], str]:
    computations: dict[str, list[_Instruction]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is None:
            continue
        if line.startswith("}"):
            current = None
            continue
        match = _INSTRUCTION.match(line)
        if match:
            root, *fields = match.groups()
            computations[current].append(_Instruction(*fields, root=bool(root)))
    return computations, entry


def _trip_count(condition: list[_Instruction]) -> int:
    constants = {}
    for instruction in condition:
        if instruction.opcode == "constant":
            value = re.match(r"(-?\d+)\)", instruction.rest)
            if value:
                constants[instruction.name] = int(value.group(1))
    for instruction in condition:
        if instruction.opcode == "compare" and "direction=LT" in instruction.rest:
            for operand in re.findall(r"%([\w.\-]+)", instruction.rest.split(")")[0]):
                if operand in constants:
                    return max(1, constants[operand])
    return 1


def _operand_shapes(instruction: _Instruction, shapes: dict[str, str]) -> list[str]:
    operands = instruction.rest.split("), ")[0]
    return [shapes[name] for name in re.findall(r"%([\w.\-]+)", operands) if name in shapes]


def _dot_flops(instruction: _Instruction, shapes: dict[str, str]) -> float:
    operands = _operand_shapes(instruction, shapes)
    if not operands:
        return 0.0
    lhs = _arrays(operands[0])[0][1] if _arrays(operands[0]) else []
    if instruction.opcode == "dot":
        found = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instruction.rest)
        contracted = 1
        for axis in found.group(1).split(",") if found and found.group(1) else []:
            contracted *= lhs[int(axis)]
        return 2.0 * _elements(instruction.shape) * contracted
    return _convolution_flops(instruction, lhs)


def _valid_taps(size: int, window: int, low: int, out: int, stride: int) -> int:
    """Window taps that fall inside the input (not on padding), summed over the outputs."""
    return sum(
        sum(1 for tap in range(window) if 0 <= position * stride + tap - low < size)
        for position in range(out)
    )


def _convolution_flops(instruction: _Instruction, lhs: list[int]) -> float:
    """2 x multiply-adds of a convolution, padding taps left out (XLA writes some batched dots
    as convolutions whose padded window slides over the batch)."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instruction.rest)
    if labels is None or "f" not in labels.group(1):
        return 0.0
    lhs_labels, _, out_labels = labels.groups()
    out = _arrays(instruction.shape)[0][1]
    groups = re.search(r"feature_group_count=(\d+)", instruction.rest)
    features = lhs[lhs_labels.index("f")] // (int(groups.group(1)) if groups else 1)
    window = re.search(r"window=\{([^}]*)\}", instruction.rest)
    fields = dict(re.findall(r"(\w+)=([0-9x_\-]+)", window.group(1))) if window else {}
    sizes = [int(k) for k in fields.get("size", "").split("x") if k]
    pads = [p.split("_") for p in fields.get("pad", "").split("x") if p]
    strides = [int(k) for k in fields.get("stride", "").split("x") if k]
    spatial_out, taps = 1, 1
    for d, k in enumerate(sizes):
        n = lhs[lhs_labels.index(str(d))]
        o = out[out_labels.index(str(d))]
        low = int(pads[d][0]) if d < len(pads) else 0
        taps *= _valid_taps(n, k, low, o, strides[d] if d < len(strides) else 1)
        spatial_out *= o
    rest = 1
    for size in out:
        rest *= size
    return 2.0 * (rest // max(1, spatial_out)) * features * taps


def _custom_call_flops(instruction: _Instruction) -> float:
    found = re.search(r'\\?"flops\\?"\s*:\s*\\?"?(\d+)', instruction.rest)
    return float(found.group(1)) if found else 0.0


def _callees(instruction: _Instruction, computations) -> list[tuple[str, float]]:
    """(callee, times it runs per run of `instruction`) of one instruction's calls."""
    if instruction.opcode == "while":
        body = re.search(r"body=%([\w.\-]+)", instruction.rest)
        condition = re.search(r"condition=%([\w.\-]+)", instruction.rest)
        trips = _trip_count(computations.get(condition.group(1), [])) if condition else 1
        return [(body.group(1), float(trips))] if body else []
    callees = []
    for key in ("calls", "to_apply", "branch_computations"):
        for found in re.finditer(key + r"=\{?([%\w.\-, ]+)\}?", instruction.rest):
            callees += [(c, 1.0) for c in re.findall(r"%([\w.\-]+)", found.group(1))]
    return [(c, f) for c, f in callees if c in computations]


def loop_aware_cost(hlo_text: str) -> dict[str, float]:
    """`{"flops", "bytes"}` of an optimised HLO module's text, loops counted per iteration
    (see the module docstring). Takes `compiled.as_text()` of a jax `Compiled`."""
    computations, entry = _parse(hlo_text)
    fused = {
        callee
        for instructions in computations.values()
        for i in instructions
        if i.opcode == "fusion"
        for callee in re.findall(r"calls=%([\w.\-]+)", i.rest)
    }
    memo: dict[str, tuple[float, float]] = {}

    def cost(name: str) -> tuple[float, float]:
        if name in memo:
            return memo[name]
        instructions = computations.get(name, [])
        shapes = {i.name: i.shape for i in instructions}
        flops = traffic = 0.0
        for instruction in instructions:
            if instruction.opcode in ("dot", "convolution"):
                flops += _dot_flops(instruction, shapes)
            elif instruction.opcode == "custom-call":
                flops += _custom_call_flops(instruction)
            if name not in fused and instruction.opcode not in _NOT_TRAFFIC:
                traffic += _traffic(instruction, shapes, computations)
            parts = [(cost(c), f) for c, f in _callees(instruction, computations)]
            if instruction.opcode == "conditional" and parts:
                # One branch runs: the cheapest counts (the costlier ones are fallbacks).
                parts = [min(parts, key=lambda part: part[0][0])]
            for (callee_flops, callee_bytes), factor in parts:
                flops += factor * callee_flops
                traffic += factor * callee_bytes
        memo[name] = (flops, traffic)
        return memo[name]

    flops, traffic = cost(entry)
    return {"flops": flops, "bytes": traffic}


def _operand_names(instruction: _Instruction) -> list[str]:
    return re.findall(r"%([\w.\-]+)", instruction.rest.split("), ")[0])


def _read_bytes(computation: str, index: int, full: int, computations, depth: int = 0) -> int:
    """Bytes a fused computation reads of its parameter `index` (`full` bytes): only the slices
    where every use is a dynamic slice, nothing where it is updated in place, following nested
    fusions."""
    body = computations.get(computation, [])
    name = next(
        (i.name for i in body if i.opcode == "parameter" and i.rest.startswith(f"{index})")), None
    )
    if name is None or depth > 8:
        return full
    total = 0
    for user in body:
        for position, operand in enumerate(_operand_names(user)):
            if operand != name:
                continue
            if user.opcode == "dynamic-slice" and position == 0:
                total += _bytes(user.shape)
            elif user.opcode == "dynamic-update-slice" and position == 0:
                continue
            elif user.opcode == "fusion" and re.search(r"calls=%([\w.\-]+)", user.rest):
                callee = re.search(r"calls=%([\w.\-]+)", user.rest).group(1)
                total += _read_bytes(callee, position, full, computations, depth + 1)
            else:
                return full
    return min(total, full)


def _traffic(instruction: _Instruction, shapes: dict[str, str], computations) -> float:
    """Bytes read and written by one top-level instruction. Slicing reads only the slice and an
    in-place update writes only the update (as XLA's cost analysis counts them), also where
    the slice or update is fused."""
    operands = [shapes.get(n, "") for n in _operand_names(instruction)]
    if instruction.opcode == "dynamic-slice":
        return 2 * _bytes(instruction.shape)
    if instruction.opcode == "dynamic-update-slice":
        return 2 * _bytes(operands[1]) if len(operands) > 1 else 0
    callee = re.search(r"calls=%([\w.\-]+)", instruction.rest)
    body = (
        computations.get(callee.group(1), []) if instruction.opcode == "fusion" and callee else []
    )
    if not body:
        return sum(_bytes(s) for s in operands) + _bytes(instruction.shape)
    inner = {i.name: i for i in body}
    total = sum(
        _read_bytes(callee.group(1), index, _bytes(shape), computations)
        for index, shape in enumerate(operands)
    )
    root = next((i for i in body if i.root), body[-1])
    outputs = [inner.get(n) for n in _operand_names(root)] if root.opcode == "tuple" else [root]
    for output in outputs:
        if output is not None and output.opcode == "dynamic-update-slice":
            update = (
                inner.get(_operand_names(output)[1]) if len(_operand_names(output)) > 1 else None
            )
            total += _bytes(update.shape) if update is not None else 0
        elif output is not None:
            total += _bytes(output.shape)
    return total
