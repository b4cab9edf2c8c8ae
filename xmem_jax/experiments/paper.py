"""The paper suite: every experiment in turn, then the findings table.

Each part is a full experiment config (`config.parts`, run in `<workdir>/<part>`) sharing one
cache, so the dataset and the default base model are built once; a rerun skips what is
finished (every stage resumes from its checkpoints). `findings.md` compares the results with
the paper's claims (`xmem_jax.report.findings`).
"""

from __future__ import annotations

import time

import ml_collections
from etils import epath

from xmem_jax import distributed, experiments
from xmem_jax.report import findings


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike, command: str) -> dict:
    workdir = epath.Path(workdir)
    timings = {}
    for name in config.order:
        start = time.perf_counter()
        part_command = (f"python -m xmem_jax.main --config={config.part_files[name]} "
                        f"--workdir={workdir / name} --config.cache_dir={config.cache_dir}")
        print(f"Paper suite: {name}", flush=True)
        experiments.run(config.parts[name], workdir / name, part_command)
        timings[name] = time.perf_counter() - start
    distributed.on_primary(findings.write_findings, workdir)
    print(f"Findings: {workdir / 'findings.md'}", flush=True)
    return {"experiment": "paper", "timings": timings, "command": command}
