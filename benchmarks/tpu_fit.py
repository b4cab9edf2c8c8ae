"""The TPU tables: every Gemma 3 size x (LoRA rank 16, full fine-tuning with the
vision tower frozen) x slice, every program of Gemma 3 4B full fine-tuning on a v5p-16, and
that fine-tuning step before and after the lean train step and fused attention
(`docs/results/lean_step/`),
compiled ahead of time with `python -m xmem_jax.compile` (the table with --mesh=recommended: one
compile a cell where the preferred layout fits; the example with --mesh=auto).

    python benchmarks/tpu_fit.py                # compile what is missing, then render
    python benchmarks/tpu_fit.py --render_only  # rewrite the tables from the results
    python benchmarks/tpu_fit.py --check        # exit 1 if a table differs from the results

Each cell's figures go to `docs/results/tpu_fit/<size>_<mode>_<slice>.json`, the 4B example's
to `docs/results/compile_gemma3_4b_full_v5p-16.json` (a file already there is kept), and the
tables between the `tpu-fit`, `tpu-example`, `lean-step` and `tpu-cost` markers are rewritten
from them (`tpu-cost`: the cells' lower-bound step times over a main-job run's fine-tuning steps),
and the `scoring-cost` and `scoring-flops` tables (recall scoring's price per evaluation and a
persona-count sweep point's, from the FLOPs `python -m xmem_jax.aot.scoring_cost` measures into
`docs/results/scoring/cost_model.json`, run when it is missing, at `SCORING_MFU` of the peak;
`vision-cache`: what caching the held-out images' soft tokens once a run would save, from the
same file), in whichever of README.md and docs/*.md holds each pair of markers, or
`--check`ed against them (`lean_step/before_<commit>.json` was compiled by the same command in
a checkout of that commit, before the lean step). Cells compile the fine-tuning step only,
without XLA's FLOP count (~30 s a cell more), so the lower-bound time is from the useful FLOPs
and XLA's bytes accessed. The batch is the Gemma configs' 16 rows of 400 tokens, or one row per
chip on slices of more than 16 chips (16 rows cannot split over 64 chips for Gemma 3 1B, whose
one KV head rules out tensor parallelism).
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # For configs/.
from configs import default as default_config  # noqa: E402
from configs.sweeps import persona_counts  # noqa: E402
from xmem_jax.aot import scoring_cost, topology  # noqa: E402
from xmem_jax.experiments import study  # noqa: E402
from xmem_jax.report.docs import MarkerError, find_block, read_block, write_block  # noqa: E402

_RENDER_ONLY = flags.DEFINE_bool("render_only", False,
                                 "Only rewrite the tables from the committed results.")
_CHECK = flags.DEFINE_bool("check", False, "Only compare the tables with what the committed "
                           "results render; exit 1 if any differs. Writes nothing.")
_JOBS = flags.DEFINE_integer("jobs", 2, "Cells compiled at once.")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "tpu_fit"
SIZES = ("gemma3_1b", "gemma3_4b", "gemma3_12b", "gemma3_27b")
MODES = {"lora16": ["--config.model.lora.rank=16"], "full": ["--config.model.lora.rank=0"]}
SLICES = {"v5p-8": ("v5p:2x2x1", 4), "v5p-16": ("v5p:2x2x2", 8), "v5p-128": ("v5p:4x4x4", 64),
          "v6e-8": ("v6e:2x4", 8), "v6e-16": ("v6e:4x4", 16), "v6e-64": ("v6e:8x8", 64)}
EXAMPLE = ROOT / "docs" / "results" / "compile_gemma3_4b_full_v5p-16.json"
# The lean train step (answer-position head, remat policies, fused attention), before and
# after, on one layout; at the study's 400 tokens and at 2048 (where attention weighs more).
LEAN_STEP = ROOT / "docs" / "results" / "lean_step"
LEAN_COMMAND = ["-m", "xmem_jax.compile", "--config=configs/default.py:gemma3_4b",
                "--topology=v5p:2x2x2", "--mesh=1,8,1", "--config.model.lora.rank=0",
                "--programs=train_finetune"]
_XLA, _LONG = ["--config.model.attention=xla"], ["--config.max_length=2048"]
LEAN_VARIANTS = {"after.json": [], "after_attention_xla.json": _XLA,
                 "after_remat_full.json": ["--config.model.remat=full"],
                 "after_2048.json": _LONG, "after_2048_attention_xla.json": _LONG + _XLA}
EXAMPLE_COMMAND = ["-m", "xmem_jax.compile", "--config=configs/default.py:gemma3_4b",
                   "--topology=v5p:2x2x2", "--mesh=auto", "--config.model.lora.rank=0"]


def cell_command(size: str, mode: str, slice_name: str) -> list[str]:
    topology, chips = SLICES[slice_name]
    command = [sys.executable, "-m", "xmem_jax.compile", f"--config=configs/default.py:{size}",
               f"--topology={topology}", "--mesh=recommended", "--programs=train_finetune",
               "--count_flops=false", *MODES[mode]]
    if chips > 16:
        command.append(f"--config.finetune.batch_size={chips}")
    return command


def run_cell(size: str, mode: str, slice_name: str) -> str:
    out = RESULTS / f"{size}_{mode}_{slice_name}.json"
    if out.exists():
        return f"{out.name}: kept"
    command = cell_command(size, mode, slice_name) + [f"--out={out}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if not out.exists():  # A failure before any figure: keep its message as the cell.
        out.write_text(json.dumps({"error": done.stderr.strip().splitlines()[-1:],
                                   "command": " ".join(["python", *command[1:-1]])}))
    return f"{out.name}: exit {done.returncode}"


def _cell_text(result: dict) -> str:
    step = result.get("programs", {}).get("train_finetune")
    if step is None:
        search = [e for e in result.get("search", []) if "peak_bytes" in e]
        if search:
            lowest = min(search, key=lambda e: e["peak_bytes"])
            return f"does not fit ({lowest['peak_bytes'] / 2**30:.0f} GiB at best)"
        return "error"
    mesh = result["mesh"]
    layout = "x".join(str(mesh[a]) for a in ("data", "fsdp", "tensor"))
    fits = "" if step["peak_hbm_fraction"] <= 1 else " (does not fit)"
    return (f"{layout}: {step['peak_bytes'] / 2**30:.1f} GiB ({step['peak_hbm_fraction']:.0%})"
            f", {step['lower_bound_seconds'] * 1e3:.0f} ms{fits}")


def render() -> str:
    header = "| size, mode | " + " | ".join(SLICES) + " |"
    lines = [header, "|" + " --- |" * (len(SLICES) + 1)]
    commits = set()
    for size in SIZES:
        for mode in MODES:
            cells = []
            for slice_name in SLICES:
                path = RESULTS / f"{size}_{mode}_{slice_name}.json"
                result = json.loads(path.read_text()) if path.exists() else None
                cells.append(_cell_text(result) if result else "not compiled")
                commits.add((result or {}).get("commit") or "unknown")
            label = "LoRA 16" if mode == "lora16" else "full, tower frozen"
            lines.append(f"| {size}, {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Compiled at commits {', '.join(sorted(commits))} ('+': with uncommitted "
              "changes, none of them on the compile path)."]
    return "\n".join(lines)


def render_example(result: dict) -> str:
    mesh = result["mesh"]
    lines = [f"Mesh chosen: data {mesh['data']} x fsdp {mesh['fsdp']} x tensor {mesh['tensor']}"
             f" (`{result['command']}`).", "",
             "| program | peak per chip (HBM) | arguments / temporaries | FLOPs per chip: XLA / "
             "useful (ratio) | lower bound | collectives | compile |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, p in result["programs"].items():
        collectives = ", ".join(f"{kind} {c['count']}" for kind, c in p["collectives"].items())
        lines.append(
            f"| {name} ({p['unit']}) | {p['peak_bytes'] / 2**30:.2f} GiB "
            f"({p['peak_hbm_fraction']:.1%}) | {p['argument_bytes'] / 2**30:.2f} / "
            f"{p['temp_bytes'] / 2**30:.2f} GiB | {p['xla_flops_per_chip']:.3g} / "
            f"{p['useful_flops_per_chip']:.3g} ({p['xla_to_useful_flops']:.2f}) | "
            f"{p['lower_bound_seconds'] * 1e3:.1f} ms | {collectives} | "
            f"{p['compile_seconds']:.0f} s |")
    return "\n".join(lines)


def render_lean_step() -> str:
    """Before (`before_*.json`, compiled at the commit its name gives), then the variants in
    `LEAN_VARIANTS` order; each row's flags are its command's, after the shared ones."""
    lines = ["| code | flags | peak per chip | temporaries | HBM bytes accessed | "
             "XLA / useful FLOPs |", "| --- | --- | --- | --- | --- | --- |"]
    paths = sorted(LEAN_STEP.glob("before_*.json")) + [LEAN_STEP / n for n in LEAN_VARIANTS]
    shared = " ".join(["python", *LEAN_COMMAND])
    for path in paths:
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        step = result["programs"]["train_finetune"]
        commit = result.get("commit") or path.stem.split("_")[-1]
        flags = result["command"].split(" --out=")[0].removeprefix(shared).strip()
        lines.append(f"| {commit} | {f'`{flags}`' if flags else '(none)'} | "
                     f"{step['peak_bytes'] / 2**30:.2f} GiB | {step['temp_bytes'] / 2**30:.2f} GiB"
                     f" | {step['bytes_accessed_per_chip'] / 2**30:.1f} GiB | "
                     f"{step['xla_to_useful_flops']:.2f} |")
    return "\n".join(lines + ["", f"Every row runs `{shared}` with its flags."])


# Slices whose cells compiled the configs' own batch of 16 rows, as a main-job run has it.
COST_SLICES = ("v5p-8", "v5p-16", "v6e-8", "v6e-16")


def finetune_steps(size: str) -> int:
    """The fine-tuning steps of one main-job run of configs/default.py:SIZE: for each seed, a
    run on the test personas, one on the development personas, and the control's if on."""
    config = default_config.get_config(size)
    return config.finetune.num_steps * (2 + bool(config.control)) * len(config.seeds)


def render_cost() -> str:
    """Per size, mode and slice: a main-job run's fine-tuning steps at the cell's lower-bound
    step time, as chip-hours and as seconds of the slice."""
    lines = ["| size, mode | steps | " + " | ".join(COST_SLICES) + " |",
             "|" + " --- |" * (len(COST_SLICES) + 2)]
    for size in SIZES:
        steps = finetune_steps(size)
        for mode in MODES:
            cells = []
            for slice_name in COST_SLICES:
                path = RESULTS / f"{size}_{mode}_{slice_name}.json"
                result = json.loads(path.read_text()) if path.exists() else {}
                step = result.get("programs", {}).get("train_finetune")
                if step is None or step["peak_hbm_fraction"] > 1:
                    cells.append("does not fit" if result else "not compiled")
                    continue
                seconds = steps * step["lower_bound_seconds"]
                chips = SLICES[slice_name][1]
                cells.append(f"{seconds * chips / 3600:.2g} chip-h ({seconds:.0f} s)")
            label = "LoRA 16" if mode == "lora16" else "full, tower frozen"
            lines.append(f"| {size}, {label} | {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Recall scoring's price: XLA's FLOPs of a query's prefill and of a candidate token
# (`xmem_jax.aot.scoring_cost`), at this share of the chips' peak.
SCORING_COST = ROOT / "docs" / "results" / "scoring" / "cost_model.json"
SCORING_COMMAND = ["-m", "xmem_jax.aot.scoring_cost", f"--out={SCORING_COST.relative_to(ROOT)}"]
SCORING_MFU = 0.4
PERSONA_COUNTS = (1_000, 10_000, 100_000)


def _duration(seconds: float) -> str:
    """Two significant figures, in the largest unit of which there are at least 2."""
    value, unit = seconds, "s"
    for name, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            value, unit = seconds / size, name
            break
    return f"{value:.0f} {unit}" if value >= 10 else f"{value:.2g} {unit}"


def _slice_flops(slice_name: str) -> float:
    """The slice's peak bf16 FLOP/s at `SCORING_MFU`."""
    chip = {"v5p": topology.CHIPS["TPU v5p"], "v6e": topology.CHIPS["TPU v6 lite"]}
    return SLICES[slice_name][1] * chip[slice_name[:3]].bf16_flops * SCORING_MFU


def render_scoring_cost() -> str:
    """Seconds of the slice per evaluation at each persona count: the default scoring, and
    exhaustive over every query."""
    measured = json.loads(SCORING_COST.read_text())["sizes"]
    lines = ["| size | personas | " + " | ".join(COST_SLICES) + " |",
             "|" + " --- |" * (len(COST_SLICES) + 2)]
    for size, figures in measured.items():
        config = default_config.get_config(size)
        for personas in PERSONA_COUNTS:
            flops = [scoring_cost.evaluation_flops(figures, config, personas, method)
                     for method in ("default", "exhaustive")]
            cells = [" / ".join(_duration(f / _slice_flops(s)) for f in flops)
                     for s in COST_SLICES]
            lines.append(f"| {size} | {personas:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_point_seconds(size: str, personas: int, slice_name: str) -> tuple[float, float]:
    """(fine-tuning, scoring) seconds of the slice, both at `SCORING_MFU`, for a point of
    configs/sweeps/persona_counts.py:SIZE at `personas` (its examples per persona and
    evaluations a run, extrapolated past its counts): the test and development runs' steps at
    the LoRA tpu-fit cell's useful FLOPs, scaled to the sweep's batch; their evaluations with
    the default scoring."""
    sweep = persona_counts.get_config(size)
    experiment, first = sweep.experiment, sweep.points[0]
    steps = max(1, round(first["overrides"]["finetune.num_steps"] / first["x"] * personas))
    evaluations = first["overrides"]["finetune.num_steps"] // first["overrides"]["eval_every"] + 1
    cell = json.loads((RESULTS / f"{size}_lora16_{slice_name}.json").read_text())
    step_seconds = (cell["programs"]["train_finetune"]["compute_seconds"] / SCORING_MFU
                    * experiment.finetune.batch_size
                    / default_config.get_config(size).finetune.batch_size)
    dev_personas = experiment.dev_personas[1] - experiment.dev_personas[0]
    runs = {personas: 1 + bool(experiment.control), dev_personas: 1}  # Runs a seed.
    measured = json.loads(SCORING_COST.read_text())["sizes"][size]
    finetune = len(experiment.seeds) * sum(runs.values()) * steps * step_seconds
    scoring = len(experiment.seeds) * evaluations * sum(
        copies * scoring_cost.evaluation_flops(measured, experiment, count, "default")
        for count, copies in runs.items()) / _slice_flops(slice_name)
    return finetune, scoring


def render_scoring_flops() -> str:
    """The measured FLOPs per size, then a persona-count sweep point's price."""
    result = json.loads(SCORING_COST.read_text())
    lines = ["| size | query | prompt width | prefill: XLA (useful) | a candidate token: XLA "
             "(useful) |", "| --- | --- | --- | --- | --- |"]
    for size, figures in result["sizes"].items():
        for kind, f in figures.items():
            lines.append(f"| {size} | {kind} | {f['prompt_width']} | {f['prefill_flops']:.3g} "
                         f"({f['useful_prefill_flops']:.3g}) | {f['token_flops']:.3g} "
                         f"({f['useful_token_flops']:.3g}) |")
    lines += ["", f"`{result['command']}` at {result['commit']}.", "",
              "| size | personas | " + " | ".join(COST_SLICES) + " |",
              "|" + " --- |" * (len(COST_SLICES) + 2)]
    for size in result["sizes"]:
        for personas in PERSONA_COUNTS:
            cells = []
            for slice_name in COST_SLICES:
                finetune, scoring = sweep_point_seconds(size, personas, slice_name)
                share = scoring / (finetune + scoring)
                cells.append(f"{_duration(finetune + scoring)} ({share:.0%} scoring)")
            lines.append(f"| {size} | {personas:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The vision-cache block: its persona counts, and the share of an evaluation's FLOPs a cache
# must save to be called worth it.
VISION_PERSONAS = (100, 1_000, 10_000, 100_000)
VISION_PAYS = 0.10
# The persona counts configs/sweeps/persona_counts.py runs on a Gemma preset.
SWEEP_PERSONAS = (1_000, 10_000)


def _pays_below(measured: dict, config, threshold: float) -> int:
    """The most study personas at which `scoring_cost.vision_share` is still `threshold` or
    more (it shrinks as personas grow); 0 if none."""
    if scoring_cost.vision_share(measured, config, 1) < threshold:
        return 0
    low, high = 1, 10**7
    while high - low > 1:
        middle = (low + high) // 2
        if scoring_cost.vision_share(measured, config, middle) >= threshold:
            low = middle
        else:
            high = middle
    return low


def _mib(size: float) -> str:
    return f"{size / 2**20:.0f} MiB"


def _percent(share: float) -> str:
    return f"{100 * share:.2g}%"


def render_vision_cache() -> str:
    """Per size: the vision tower's FLOPs per image, the share of a default evaluation they
    are at `VISION_PERSONAS` (what a once-a-run cache of the soft tokens saves at each later
    evaluation) with the cache's size, and a verdict from those shares."""
    result = json.loads(SCORING_COST.read_text())
    lines = ["| size | vision tower per image: XLA (useful) | in candidate tokens | of an image "
             "prefill | " + " | ".join(f"{n:,} personas" for n in VISION_PERSONAS) + " |",
             "|" + " --- |" * (len(VISION_PERSONAS) + 4)]
    below, sweep_shares = [], []
    for size, figures in result["sizes"].items():
        config = default_config.get_config(size)
        model_config = study.model_config_for(config)
        image = figures["image"]
        cells = [f"{_percent(scoring_cost.vision_share(figures, config, n))} ("
                 f"{_mib(scoring_cost.soft_token_cache_bytes(model_config, config, n))})"
                 for n in VISION_PERSONAS]
        lines.append(f"| {size} | {image['vision_flops']:.3g} ({image['useful_vision_flops']:.3g})"
                     f" | {image['vision_flops'] / image['token_flops']:,.0f} | "
                     f"{image['vision_flops'] / image['prefill_flops']:.0%} | "
                     + " | ".join(cells) + " |")
        below.append(f"~{float(f'{_pays_below(figures, config, VISION_PAYS):.2g}'):,.0f}")
        sweep_shares += [scoring_cost.vision_share(figures, config, n) for n in SWEEP_PERSONAS]
    sizes = ", ".join(result["sizes"])
    pays = max(sweep_shares) >= VISION_PAYS
    prose = ["Each cell: the share of a default evaluation's FLOPs "
             "(`scoring_cost.evaluation_flops`) the tower takes, which the cache would save at "
             "every evaluation after the first, and the cache's size (the bf16 soft tokens of "
             "every scored image).",
             f"Verdict: the cache would save {VISION_PAYS:.0%} or more of an evaluation only "
             f"up to {', '.join(below[:-1])} and {below[-1]} study personas ({sizes}); at the "
             f"{' and '.join(f'{n:,}' for n in SWEEP_PERSONAS)} personas of the Gemma sweep "
             f"(`configs/sweeps/persona_counts.py`) it would save "
             f"{_percent(min(sweep_shares))} to {_percent(max(sweep_shares))}. These are FLOP "
             "counts, not timings; "
             + ("the saving is large enough at the sweep's counts to be worth a cache, which "
                "has not been implemented." if pays else
                "no cache was implemented, since at the sweep's counts the candidate tokens, "
                "which grow with the personas, and not the fixed sample's images decide what "
                "an evaluation costs.")]
    return "\n".join(lines + ["", "\n\n".join(textwrap.fill(p, 100) for p in prose)])


BLOCKS = ("tpu-example", "lean-step", "tpu-fit", "tpu-cost", "scoring-cost", "scoring-flops",
          "vision-cache")


def render_blocks() -> dict[str, str]:
    """Every block this script owns, rendered from the results in docs/results/; no writes."""
    blocks = {"tpu-example": render_example(json.loads(EXAMPLE.read_text())),
              "lean-step": render_lean_step(), "tpu-fit": render(), "tpu-cost": render_cost(),
              "scoring-cost": render_scoring_cost(), "scoring-flops": render_scoring_flops(),
              "vision-cache": render_vision_cache()}
    assert tuple(blocks) == BLOCKS
    return blocks


def stale_blocks() -> list[str]:
    """The blocks whose committed text differs from what the results render."""
    return [name for name, text in render_blocks().items() if read_block(name) != text]


def main(argv):
    del argv
    try:  # Before any compile: a missing marker fails now, not after the compiles.
        for name in BLOCKS:
            find_block(name)
    except MarkerError as e:
        sys.exit(f"tpu_fit: {e}")
    if _CHECK.value:
        stale = stale_blocks()
        for name in stale:
            print(f"{find_block(name).relative_to(ROOT)}: the {name} block differs from what "
                  "docs/results/ renders; rerun with --render_only")
        sys.exit(1 if stale else 0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not _RENDER_ONLY.value:
        if not EXAMPLE.exists():
            subprocess.run([sys.executable, *EXAMPLE_COMMAND,
                            f"--out={EXAMPLE.relative_to(ROOT)}"], cwd=ROOT, check=True)
        for name, extra in LEAN_VARIANTS.items():
            if not (LEAN_STEP / name).exists():
                subprocess.run([sys.executable, *LEAN_COMMAND, *extra,
                                f"--out={(LEAN_STEP / name).relative_to(ROOT)}"], cwd=ROOT,
                               check=True)
        if not SCORING_COST.exists():
            subprocess.run([sys.executable, *SCORING_COMMAND], cwd=ROOT, check=True)
        cells = [(s, m, c) for s in SIZES for m in MODES for c in SLICES]
        with concurrent.futures.ThreadPoolExecutor(_JOBS.value) as pool:
            for line in pool.map(lambda cell: run_cell(*cell), cells):
                print(line, flush=True)
    blocks = render_blocks()
    for name, table in blocks.items():
        print(f"{write_block(name, table).relative_to(ROOT)}: {name}")
    print(blocks["tpu-example"], blocks["tpu-fit"], sep="\n\n")


if __name__ == "__main__":
    app.run(main)
