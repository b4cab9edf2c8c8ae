"""The main job: runs the experiment a config describes, resuming in --workdir.

    python -m xmem_jax.main --config=configs/default.py --workdir=runs/default

Several processes (one per host of a TPU slice, or CPU processes on one machine) run it
together with --jax_distributed; on a TPU VM the environment supplies the rest. Elsewhere:

    python -m xmem_jax.main --coordinator_address=localhost:12345 --num_processes=2 \
        --process_id=0 --num_cpu_devices=4 --config=... --workdir=...   # and --process_id=1

The processes must share --workdir and the config's cache_dir (checked at the start).
"""

import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from xmem_jax import provenance

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Results and checkpoints; reruns resume here.")
_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False,
    "Run as one of several JAX processes (jax.distributed.initialize() first). Implied by "
    "--coordinator_address; on a TPU VM the environment supplies the address and ids.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT where process 0 serves the coordinator (every "
    "process gives the same one).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "How many processes run the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's id, 0 to --num_processes - 1.")
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", None, "Fake CPU devices in this process (CPU runs; like "
    "XLA_FLAGS=--xla_force_host_platform_device_count).")
_TIMEOUT = flags.DEFINE_integer("initialization_timeout", 300,
                                "Seconds a process waits for the others to connect.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    provenance.source_commit()  # The code this job imported, before anything is committed.
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
    from xmem_jax import distributed  # Imports jax, which reads no device until used.

    if _DISTRIBUTED.value or any(flag.value is not None
                                 for flag in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)):
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               num_cpu_devices=_NUM_CPU_DEVICES.value,
                               timeout_s=_TIMEOUT.value)  # Before any device is touched.
    elif _NUM_CPU_DEVICES.value is not None:
        import jax

        jax.config.update("jax_num_cpu_devices", _NUM_CPU_DEVICES.value)
    import jax

    config = _CONFIG.value
    distributed.check_batch_sizes(config, jax.process_count())
    distributed.check_shared({"--workdir": _WORKDIR.value,
                              **({"cache_dir": config.cache_dir} if config.get("cache_dir")
                                 else {})})
    from xmem_jax import experiments  # After flag parsing: Grain workers re-import main.

    experiments.use_compilation_cache(config.get("cache_dir"))
    command = "python -m xmem_jax.main " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    experiments.run(config, _WORKDIR.value, command)
    if distributed.is_primary():
        print(f"Results in {_WORKDIR.value}: results.json, report.md and plots")


if __name__ == "__main__":
    app.run(main)
