"""Fit a study's programs to a slice: pick a layout, compile, and report the figures per chip.

The library behind `python -m xmem_jax.compile` (see its docstring for what it prints and how
`--mesh` chooses): `run(config, topology, mesh_arg, ...)` returns the figures as a dict and
raises `DoesNotFit`, with the figures found so far, when the fine-tuning step needs more HBM
than a chip has.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np

from xmem_jax.aot import analysis, programs
from xmem_jax.aot import topology as topology_lib
from xmem_jax.experiments import study
from xmem_jax.train import optim, sharding, trainer

GiB = 2**30
_SMALLER = "LoRA (--config.model.lora.rank=16), a smaller batch or a larger slice."
_ADVICE = f"Try --mesh=auto, {_SMALLER}"


class DoesNotFit(RuntimeError):
    """The fine-tuning step needs more HBM than a chip has; `report` holds the figures."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def parse_mesh(text: str, chips: int, topology: str) -> tuple[int, int, int]:
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"--mesh={text!r}: give 'config', 'recommended', 'auto' or three sizes "
                         "data,fsdp,tensor, e.g. 1,4,1")
    if math.prod(sizes) != chips:
        raise ValueError(f"--mesh={text} has {math.prod(sizes)} devices but {topology} has "
                         f"{chips} chips: the sizes must multiply to {chips}")
    return sizes


def config_mesh(config, chips: int) -> tuple[int, int, int]:
    sizes = trainer.mesh_sizes(config.finetune.mesh, chips)
    return tuple(sizes[axis] for axis in sharding.MESH_AXES)


def layouts(chips: int, kv_heads: int) -> list[tuple[int, int, int]]:
    """Data-parallel and FSDP layouts of `chips`, each with every tensor size that divides
    both the chips and the KV heads."""
    out = []
    for tensor in range(1, chips + 1):
        if chips % tensor or kv_heads % tensor:
            continue
        rest = chips // tensor
        out.append((1, rest, tensor))
        if rest > 1:
            out.append((rest, 1, tensor))
    return out


def batch_hint(config, chips: int, kv_heads: int) -> str:
    """The layouts of the slice that split the fine-tuning batch, for an error message."""
    batch = int(config.finetune.batch_size)
    accum = int(config.finetune.optim.grad_accum_steps)
    fitting = [layout for layout in layouts(chips, kv_heads)
               if batch % (layout[0] * layout[1] * accum) == 0]
    if not fitting:
        return (f"No layout of these {chips} chips splits batch {batch} (tensor parallelism "
                f"is at most the {kv_heads} KV heads wide): raise --config.finetune.batch_size "
                f"to a multiple of {chips // math.gcd(chips, kv_heads) * accum}.")
    return "Layouts of this slice that split it (--mesh=D,F,T): " + ", ".join(
        ",".join(map(str, layout)) for layout in fitting)


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    return int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize


def state_bytes_per_chip(state) -> int:
    return sum(_shard_bytes(x) for x in jax.tree.leaves(state))


def largest_state(state, top: int = 3) -> list[tuple[str, int]]:
    """The training state's largest arrays per chip: (path, bytes)."""
    sizes = [(optim.path_name(path), _shard_bytes(x))
             for path, x in jax.tree_util.tree_flatten_with_path(state)[0]]
    return sorted(sizes, key=lambda item: -item[1])[:top]


def choose_mesh(config, model_config, devices, chip, answer_tokens, log, auto: bool) -> tuple:
    """--mesh=auto (`auto`) or recommended: (sizes, mesh, (compiled fine-tuning step, its
    compile seconds), search log)."""
    kv_heads = model_config.text.num_kv_heads
    batch = int(config.finetune.batch_size)
    accum = int(config.finetune.optim.grad_accum_steps)
    candidates, search = [], []
    for sizes in layouts(len(devices), kv_heads):
        if batch % (sizes[0] * sizes[1] * accum):
            search.append({"mesh": sizes, "skipped": f"batch {batch} does not split over "
                                                     f"{sizes[0] * sizes[1]} x {accum}"})
            continue
        mesh = sharding.make_mesh(*sizes, devices=devices)
        try:
            program = programs.train_program(config, "finetune", model_config, mesh,
                                             answer_tokens)
            state = program.build(model_config, mesh)[1][0]
        except ValueError as error:  # A dimension the layout cannot shard.
            search.append({"mesh": sizes, "skipped": str(error)})
            continue
        candidates.append((state_bytes_per_chip(state), sizes[2], sizes[0], sizes, mesh,
                           program))
    if not candidates:
        raise ValueError(f"--mesh={'auto' if auto else 'recommended'}: no layout of "
                         f"{len(devices)} chips splits the "
                         f"fine-tuning batch. {batch_hint(config, len(devices), kv_heads)}")
    if auto:
        order = sorted(candidates, key=lambda c: c[:3])
    else:
        lora = bool(config.model.lora.rank)
        hbm = chip.hbm_bytes if chip else float("inf")

        def preference(candidate):
            state_bytes, tensor, data = candidate[:3]
            if data > 1:  # Data parallelism: first for LoRA if its replicated state fits.
                return (0 if lora and state_bytes < hbm else 2), tensor
            return 1, tensor  # FSDP.

        order = sorted(candidates, key=preference)
    best = None
    for state_bytes, _, _, sizes, mesh, program in order:
        entry = {"mesh": sizes, "state_bytes": state_bytes}
        if best is not None and (not auto or state_bytes >= best["peak_bytes"]):
            entry["skipped"] = ("its state alone is no lower than the best peak" if auto
                                else "a preferred layout fits")
        else:
            start = time.perf_counter()
            try:
                compiled = analysis.compile_program(program.lower(model_config, mesh))
                entry.update(analysis.memory(compiled))
            except analysis.OutOfMemory as error:
                entry.update(error=str(error), peak_bytes=state_bytes + error.required_bytes)
            entry["compile_seconds"] = time.perf_counter() - start
            fits = "error" not in entry and (chip is None or entry["peak_bytes"] <= chip.hbm_bytes)
            entry["fits"] = fits
            if fits and (best is None or entry["peak_bytes"] < best["peak_bytes"]):
                best = {**entry, "compiled": (compiled, entry["compile_seconds"]),
                        "mesh_object": mesh}
            log(f"  tried mesh {sizes}: peak {entry['peak_bytes'] / GiB:.2f} GiB"
                + ("" if fits else " (does not fit)"))
        search.append(entry)
    if best is None:
        lowest = min((e for e in search if "peak_bytes" in e), key=lambda e: e["peak_bytes"])
        raise DoesNotFit(f"No layout fits: the lowest peak is {_gib(lowest['peak_bytes'])} per "
                         f"chip on mesh {lowest['mesh']}, against {_gib(chip.hbm_bytes)} of "
                         f"HBM. Try {_SMALLER}", {"search": search})
    return best["mesh"], best["mesh_object"], best["compiled"], search


def _gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def describe(figures: dict) -> list[str]:
    lines = [f"{figures['program']} ({figures['unit']}):",
             f"  memory per chip: arguments {_gib(figures['argument_bytes'])}, outputs "
             f"{_gib(figures['output_bytes'])}, temporaries {_gib(figures['temp_bytes'])}, "
             f"aliased {_gib(figures['alias_bytes'])}; peak {_gib(figures['peak_bytes'])}"
             + (f" = {figures['peak_hbm_fraction']:.1%} of {_gib(figures['hbm_bytes'])} HBM"
                if "peak_hbm_fraction" in figures else "")]
    if "xla_flops_per_chip" in figures:
        lines.append(f"  FLOPs per chip: XLA {figures['xla_flops_per_chip']:.3e}, useful "
                     f"{figures['useful_flops_per_chip']:.3e}, ratio "
                     f"{figures['xla_to_useful_flops']:.2f}")
    if "lower_bound_seconds" in figures:
        lines.append(f"  lower-bound time: compute {figures['compute_seconds'] * 1e3:.1f} ms, "
                     f"HBM {figures['memory_seconds'] * 1e3:.1f} ms -> "
                     f"{figures['lower_bound_seconds'] * 1e3:.1f} ms")
    collectives = ", ".join(f"{kind} {c['count']} ({_gib(c['bytes'])})"
                            for kind, c in figures["collectives"].items()) or "none"
    if "lower_bound_from" in figures:
        lines[-1] += f" (from {figures['lower_bound_from']})"
    lines.append(f"  collectives (ops in the program text, result bytes): {collectives}")
    lines.append(f"  compile {figures['compile_seconds']:.1f} s"
                 + (f" (+ {figures['count_seconds']:.1f} s for the FLOP count)"
                    if "count_seconds" in figures else ""))
    return lines


def run(config, topology: str, mesh_arg: str = "config", names=None,
        answer_tokens: int = 8, count_flops: bool = True, model_config=None, log=print) -> dict:
    """Compiles the programs `names` (default: all the main job runs) of study `config` for
    `topology` and returns their figures; raises `DoesNotFit` after logging them if the
    fine-tuning step does not fit. `model_config` replaces the config's architecture (e.g. a
    preset with fewer layers)."""
    devices = topology_lib.slice_devices(topology)
    chip = topology_lib.chip_of(devices[0])
    model_config = model_config or study.model_config_for(config)
    chips = len(devices)
    log(f"{topology}: {chips} x {devices[0].device_kind}"
        + (f" ({chip.hbm_bytes / GiB:.0f} GiB HBM, {chip.bf16_flops / 1e12:.0f} bf16 TFLOP/s, "
           f"{chip.hbm_bandwidth / 1e9:.0f} GB/s each)" if chip else ""))
    compiled_step, search = None, []
    if mesh_arg in ("auto", "recommended"):
        sizes, mesh, compiled_step, search = choose_mesh(config, model_config, devices, chip,
                                                         answer_tokens, log, mesh_arg == "auto")
    else:
        sizes = (config_mesh(config, chips) if mesh_arg == "config"
                 else parse_mesh(mesh_arg, chips, topology))
        mesh = sharding.make_mesh(*sizes, devices=devices)
    data, fsdp, tensor = sizes
    log(f"mesh: data={data} fsdp={fsdp} tensor={tensor} (main job: --config.finetune.mesh.data="
        f"{data} --config.finetune.mesh.fsdp={fsdp} --config.finetune.mesh.tensor={tensor})")
    names = names or programs.TRAIN + programs.SCORE
    try:
        selected = programs.study_programs(config, model_config, mesh, names, answer_tokens)
    except ValueError as error:
        if "batch_size" in str(error):
            raise ValueError(f"{error} {batch_hint(config, chips, model_config.text.num_kv_heads)}"
                             ) from None
        raise
    report = {"topology": topology, "chips": chips, "device_kind": devices[0].device_kind,
              "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor}, "search": search,
              "answer_tokens": answer_tokens, "programs": {}}
    for program in selected:
        try:
            figures = analysis.analyze(program, model_config, mesh, chip, count_flops,
                                   compiled=compiled_step if program.name == "train_finetune"
                                   else None)
        except analysis.OutOfMemory as error:
            if program.name != "train_finetune":
                raise DoesNotFit(f"{program.name} does not fit: {error}", report) from None
            state = program.build(model_config, mesh)[1][0]
            raise DoesNotFit(
                f"train_finetune does not fit: {error} The largest part: temporaries "
                f"(activations, gradients), {_gib(error.required_bytes)}; the training state "
                f"takes {_gib(state_bytes_per_chip(state))} per chip more. {_ADVICE}",
                report) from None
        report["programs"][program.name] = figures
        for line in describe(figures):
            log(line)
    step = report["programs"].get("train_finetune")
    if step is not None and chip is not None and step["peak_bytes"] > chip.hbm_bytes:
        program = next(p for p in selected if p.name == "train_finetune")
        state = program.build(model_config, mesh)[1][0]
        parts = {"training state and batch (arguments)": step["argument_bytes"],
                 "temporaries (activations, gradients)": step["temp_bytes"],
                 "outputs not donated": step["output_bytes"] - step["alias_bytes"]}
        largest = max(parts, key=parts.get)
        arrays = ", ".join(f"{path} {_gib(size)}" for path, size in largest_state(state))
        report["does_not_fit"] = {"largest_part": largest, "largest_state_arrays": arrays}
        raise DoesNotFit(
            f"train_finetune does not fit: peak {_gib(step['peak_bytes'])} per chip against "
            f"{_gib(chip.hbm_bytes)} of HBM. The largest part: {largest}, "
            f"{_gib(parts[largest])}; the largest state arrays per chip: {arrays}. {_ADVICE}",
            report)
    return report
