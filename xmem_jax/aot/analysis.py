"""What a compiled program needs per chip: memory, FLOPs, HBM traffic, collectives.

Memory and collectives come from the program compiled for the slice (`memory_analysis()`, its
HLO). FLOPs come from XLA's cost analysis, which counts a loop body once however often it runs:
a scanned decoder of 34 layers reads as one layer, and on multi-host slices the partitioner
turns large matmuls into loops of its own (windowed einsums). So the FLOPs are counted on
shallow copies of the program, its layers unrolled, compiled unpartitioned for one CPU device,
at two depths of each tower, extrapolated linearly to the real depth (every layer of a tower
runs the same ops) and divided by the chips. Other loops stay counted once: gradient
accumulation is compiled as one micro-batch and multiplied, and a scoring program's decode or
candidate loop is one step of it, like its useful count (`Program.unit`).

HBM traffic has no such correction: the bound uses XLA's bytes accessed on the slice (loop
bodies once) or the arguments read once, whichever is more; both are lower bounds.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections import Counter

import jax

from xmem_jax.aot.programs import Program
from xmem_jax.aot.topology import Chip
from xmem_jax.model.config import VLMConfig
from xmem_jax.train import sharding

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_COLLECTIVE = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_REQUIRED = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\)")


class OutOfMemory(RuntimeError):
    """The TPU compiler refused a program that cannot fit in HBM; `required_bytes` is what it
    said the temporaries alone need."""

    def __init__(self, message: str, required_bytes: float):
        super().__init__(message)
        self.required_bytes = required_bytes


def compile_program(lowered: jax.stages.Lowered) -> jax.stages.Compiled:
    """`lowered.compile()`, with the TPU compiler's out-of-HBM refusal as `OutOfMemory`."""
    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        text = str(error)
        if "Ran out of memory" not in text:
            raise
        match = _REQUIRED.search(text)
        scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
        required = float(match.group(1)) * scale[match.group(2)] if match else float("nan")
        raise OutOfMemory(text.splitlines()[0], required) from None


def memory(compiled: jax.stages.Compiled) -> dict[str, int]:
    """Bytes per chip: arguments, outputs, temporaries, aliased (donated), and the peak."""
    stats = compiled.memory_analysis()
    figures = {"argument_bytes": stats.argument_size_in_bytes,
               "output_bytes": stats.output_size_in_bytes,
               "temp_bytes": stats.temp_size_in_bytes,
               "alias_bytes": stats.alias_size_in_bytes}
    # Donated arguments are reused for outputs; what is live at once is at most this.
    bound = (figures["argument_bytes"] + figures["output_bytes"] - figures["alias_bytes"]
             + figures["temp_bytes"])
    peak = getattr(stats, "peak_memory_in_bytes", 0)
    figures["peak_bytes"] = int(peak) if peak else int(bound)
    return figures


def _largest_array_bytes(text: str) -> int:
    sizes = [_DTYPE_BYTES[dtype] * _product(dims) for dtype, dims in _SHAPE.findall(text)]
    return max(sizes, default=0)


def _product(dims: str) -> int:
    out = 1
    for d in dims.split(","):
        if d:
            out *= int(d)
    return out


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """Per collective kind: its ops in the program text and their result bytes per chip (the
    largest array of each result; a loop body's ops are counted once)."""
    count, size = Counter(), Counter()
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.search(line)
        if match:
            kind = match.group(2)
            count[kind] += 1
            size[kind] += _largest_array_bytes(match.group(1))
    return {kind: {"count": count[kind], "bytes": size[kind]} for kind in COLLECTIVES
            if count[kind]}


def _cost(compiled: jax.stages.Compiled) -> tuple[float, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # Older jax: one dict per computation.
        cost = cost[0]
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def _shallow(model_config: VLMConfig, text_layers: int, vision_layers: int) -> VLMConfig:
    text = dataclasses.replace(model_config.text, num_layers=text_layers)
    vision = (None if model_config.vision is None
              else dataclasses.replace(model_config.vision, depth=vision_layers))
    return dataclasses.replace(model_config, text=text, vision=vision, scan_layers=False)


def xla_flops(program: Program, model_config: VLMConfig) -> float:
    """XLA's FLOPs for one call of `program` on the whole batch: unpartitioned, unrolled copies
    one and two layers deep past its frozen layers, extrapolated to the real depth."""
    one_device = sharding.make_mesh(1, 1, 1, devices=jax.devices("cpu")[:1])
    text_base = program.frozen_layers + 1
    depths = [(text_base, 1), (text_base + 1, 1)]
    if model_config.vision is not None:
        depths.append((text_base, 2))
    counts = []
    for text_layers, vision_layers in depths:
        lowered = program.lower(_shallow(model_config, text_layers, vision_layers), one_device,
                                micro=True)
        counts.append(_cost(compile_program(lowered))[0])
    flops = counts[0] + (model_config.text.num_layers - text_base) * (counts[1] - counts[0])
    if model_config.vision is not None:
        flops += (model_config.vision.depth - 1) * (counts[2] - counts[0])
    return flops * program.repeats


def analyze(program: Program, model_config: VLMConfig, mesh: jax.sharding.Mesh,
            chip: Chip | None, count_flops: bool = True,
            compiled: tuple[jax.stages.Compiled, float] | None = None) -> dict:
    """Compiles `program` for `mesh` and returns its figures per chip (see the module doc):
    memory, the peak's share of HBM, XLA's and the useful FLOPs, a lower-bound time, the
    collectives and the compile time. `compiled`: (the program compiled already, seconds)."""
    if compiled is None:
        start = time.perf_counter()
        compiled = (compile_program(program.lower(model_config, mesh)),
                    time.perf_counter() - start)
    compiled, seconds = compiled
    figures = {"program": program.name, "unit": program.unit, "compile_seconds": seconds,
               **memory(compiled), "collectives": collectives(compiled.as_text())}
    chips = mesh.devices.size
    figures["useful_flops_per_chip"] = program.useful_flops / chips
    # Lower bounds on HBM traffic: XLA's count (loop bodies once), the arguments read once.
    figures["bytes_accessed_per_chip"] = max(_cost(compiled)[1], figures["argument_bytes"])
    if count_flops:
        start = time.perf_counter()
        figures["xla_flops_per_chip"] = xla_flops(program, model_config) / chips
        figures["count_seconds"] = time.perf_counter() - start
        figures["xla_to_useful_flops"] = (figures["xla_flops_per_chip"]
                                          / figures["useful_flops_per_chip"])
    if chip is not None:
        figures["hbm_bytes"] = chip.hbm_bytes
        figures["peak_hbm_fraction"] = figures["peak_bytes"] / chip.hbm_bytes
        # Without XLA's count, the useful FLOPs: a looser bound.
        work = figures.get("xla_flops_per_chip", figures["useful_flops_per_chip"])
        figures["lower_bound_from"] = ("XLA's" if count_flops else "useful") + " FLOPs"
        figures["compute_seconds"] = work / chip.bf16_flops
        figures["memory_seconds"] = figures["bytes_accessed_per_chip"] / chip.hbm_bandwidth
        figures["lower_bound_seconds"] = max(figures["compute_seconds"],
                                             figures["memory_seconds"])
    return figures
