"""Fit before you rent: compile the main job's programs ahead of time for a TPU slice.

    python -m xmem_jax.compile --config=configs/default.py:gemma3_4b --topology=v5p:2x2x1
    python -m xmem_jax.compile --config=configs/default.py:gemma3_4b --topology=v5p:2x2x2 \
        --mesh=auto --config.model.lora.rank=0     # full fine-tuning, the layout chosen
    python -m xmem_jax.compile --config=configs/default.py --topology=cpu:4   # fake CPU devices

From abstract shapes and without weights (no checkpoint is read beyond its config.json), it
compiles the programs the main job runs for the config (`xmem_jax.aot.programs`) for the
slice's chips, as libtpu describes them, and prints per program: bytes per chip (arguments,
outputs, temporaries, the peak and its share of the chip's HBM), XLA's FLOPs next to the useful
FLOPs (`xmem_jax.model.flops`), a lower-bound time (FLOPs over the chip's bf16 peak, bytes over
its HBM bandwidth), the collectives, and the compile time. Its last two lines are
`xla_to_useful_flops: X` and `peak_hbm_fraction: X` for the fine-tuning step; `--out` gets the
same figures as JSON. It exits with 1 when the fine-tuning step does not fit.

--mesh: 'config' (the config's `finetune.mesh`, as the main job would use it), D,F,T (data,
fsdp, tensor), 'recommended' or 'auto'. Both search the data-parallel and FSDP layouts, each
with every tensor size that divides the KV heads, whose batch devices split the batch.
'recommended' compiles them in docs/tpu.md's order of preference and keeps the first that fits:
for LoRA, data parallelism (the frozen weights replicated: no per-layer all-gathers) where the
replicated state fits, then FSDP; for full fine-tuning, FSDP; the narrowest tensor axis first.
'auto' compiles them in order of their training state's bytes per chip and keeps the lowest
peak that fits; a layout whose state alone is no lower than the best peak found cannot win and
is not compiled. Either prints the `--config.finetune.mesh.*` overrides for the main job.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from etils import epath
from ml_collections import config_flags

from xmem_jax.aot import fit
from xmem_jax.provenance import source_commit

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "A TPU slice, e.g. v5p:2x2x1 (v5p-8), v5p:2x2x2 (v5p-16), v6e:2x4 "
    "(v6e-8), v5e:2x2; or cpu:N for N fake CPU devices.")
_MESH = flags.DEFINE_string("mesh", "config", "'config', 'recommended', 'auto', or "
                            "data,fsdp,tensor sizes.")
_PROGRAMS = flags.DEFINE_list("programs", None, "Programs to compile (default: all the main "
                              "job runs): train_base, train_finetune, prefill, greedy, "
                              "candidates.")
_ANSWER_TOKENS = flags.DEFINE_integer("answer_tokens", 8, "Tokens in an answer: the loss and "
                                      "head positions per train row, the candidates' length.")
_COUNT_FLOPS = flags.DEFINE_bool(
    "count_flops", True, "Count XLA's FLOPs (compiles shallow unrolled copies of each program "
    "on the CPU: ~30 s a program for a Gemma 3 size). Off: the lower-bound time uses the useful "
    "FLOPs.")
_OUT = flags.DEFINE_string("out", "runs/compile.json", "Where to write the figures as JSON.")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
    del argv
    error, commit = None, source_commit()  # The code that runs, not what a later commit adds.
    try:
        report = fit.run(_CONFIG.value, _TOPOLOGY.value, _MESH.value, _PROGRAMS.value,
                     _ANSWER_TOKENS.value, _COUNT_FLOPS.value)
    except fit.DoesNotFit as e:
        error, report = e, e.report
    except ValueError as e:  # A bad name, mesh or batch: the message says what to change.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    out = epath.Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    report["command"] = "python -m xmem_jax.compile " + " ".join(sys.argv[1:])
    report["commit"] = commit
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"figures: {out}")
    step = report.get("programs", {}).get("train_finetune")
    if step is not None:
        print(f"xla_to_useful_flops: {step.get('xla_to_useful_flops', float('nan')):.3f}")
        print(f"peak_hbm_fraction: {step.get('peak_hbm_fraction', float('nan')):.3f}")
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    # Programs are only compiled here: no backend but the CPU's starts (libtpu, if installed,
    # would otherwise try to claim a TPU); TPU slices come from libtpu's topology description.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    for arg in sys.argv:
        if arg.startswith("--topology=cpu:"):  # Before jax starts: fake CPU devices.
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                       f" --xla_force_host_platform_device_count={arg[15:]}")
    app.run(main)
