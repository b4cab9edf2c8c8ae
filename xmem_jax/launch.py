"""Cloud TPU slices through the gcloud CLI: create one, install this repository on every host,
run the main job (or one sweep point) on all of them, watch, stop and delete it.

    python -m xmem_jax.launch create --flagfile=v5p16.flags    # --name, --zone, ... in a file
    python -m xmem_jax.launch setup  --flagfile=v5p16.flags
    python -m xmem_jax.launch run    --flagfile=v5p16.flags -- \\
        --config=configs/default.py:gemma3_4b --workdir=gs://BUCKET/runs/gemma3_4b
    python -m xmem_jax.launch status|stop|delete --flagfile=v5p16.flags

Every subcommand takes --dry_run: it prints the gcloud commands it would run and runs none.
After `run --`, the main job's flags (or, with --sweep_point=K, the sweep's). The walk-through,
preemption and costs: docs/tpu.md.

- create: a queued resource (the way to get v5e, v5p and v6e capacity; --queued=false: a plain
  TPU VM), spot with --spot, on demand without; it waits until the slice is ACTIVE.
- setup: packs this checkout's files (git ls-files: tracked, and untracked but not ignored),
  copies them to every host and installs them with the exact versions of constraints.txt into
  a Python 3.11 virtual environment (uv, pinned below). Rerunning it gives the same install.
- run: every host runs the job at once (`tpu-vm ssh --worker=all`), multi-host slices with
  --jax_distributed; the logs stream back here. When one host's process dies, JAX's
  coordination service stops the others (a process is declared dead after 100 s without a
  heartbeat; before they have connected, the others give up after the main job's
  --initialization_timeout, 300 s).
  Ctrl-C here stops the job on every host (it saves a checkpoint on SIGTERM). Rerunning `run`
  resumes from the last checkpoint in --workdir; with --recreate_if_preempted a reclaimed spot
  slice is deleted, recreated and set up first, and again whenever the run ends with the slice
  reclaimed.
"""

from __future__ import annotations

import dataclasses
import io
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from absl import app, flags

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("create", "setup", "run", "status", "stop", "delete")

# The TPU software version for JAX on each generation, from the Cloud TPU documentation's
# "TPU software versions" (https://cloud.google.com/tpu/docs/runtimes, read 2026-12-01).
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
                    "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
QUEUED_BY_DEFAULT = ("v5litepod", "v5p", "v6e")
# The largest accelerator type one host serves: v4-8 and v5p-8 (8 TensorCores, 4 chips),
# v5litepod-8 and v6e-8 (8 chips). Larger slices have several hosts, one process on each.
MAX_SINGLE_HOST_SIZE = 8
# constraints.txt was frozen under Python 3.11 (its header), which jax 0.10 needs at least.
PYTHON_VERSION = "3.11"
UV_VERSION = "0.13.9"

# On every host, under the home directory.
CODE_DIR, VENV_DIR, ARCHIVE, PID_FILE = "xmem-jax", "xmem-jax-venv", "xmem-jax.tgz", "xmem-jax.pid"
# What `describe` says of a reclaimed spot slice: its queued resource's state, or its TPU VM's.
RECLAIMED_STATES = {"queued": ("SUSPENDING", "SUSPENDED"), "vm": ("PREEMPTED", "TERMINATED")}
POLL_SECONDS = 60

_NAME = flags.DEFINE_string("name", None, "The TPU's name (and its queued resource's).")
_ZONE = flags.DEFINE_string("zone", None, "Its zone, e.g. us-east5-a.")
_ACCELERATOR = flags.DEFINE_string(
    "accelerator_type", None, "As gcloud names it: v5p-16, v5litepod-16 (v5e), v6e-16, v4-32.")
_PROJECT = flags.DEFINE_string("project", None, "Google Cloud project (default: gcloud's).")
_VERSION = flags.DEFINE_string(
    "version", None, "TPU software version (default: the one Cloud TPU names for JAX on the "
    "generation: " + ", ".join(f"{g}: {v}" for g, v in RUNTIME_VERSIONS.items()) + ").")
_SPOT = flags.DEFINE_bool("spot", False, "Spot capacity: cheaper, can be reclaimed any time.")
_QUEUED = flags.DEFINE_bool(
    "queued", None, "A queued resource (default for v5e, v5p, v6e) or a plain TPU VM (default "
    "for v4). status, stop, run and delete must be given the same.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the gcloud commands; run nothing.")
_SWEEP_POINT = flags.DEFINE_integer(
    "sweep_point", None, "run: `python -m xmem_jax.sweep --point=K` instead of the main job "
    "(the sweep's flags after --).")
_CHECKPOINT_DIR = flags.DEFINE_string(
    "checkpoint_dir", None, "A Hugging Face checkpoint in a bucket, e.g. gs://BUCKET/"
    "gemma-3-4b-it: setup copies it to every host (~/checkpoints/<its name>), run points the "
    "job's model.checkpoint at that copy. Give it to both.")
_RECREATE = flags.DEFINE_bool(
    "recreate_if_preempted", False, "run: if the spot slice was reclaimed (before or during "
    "the run), delete it, create it again, set it up and resume.")
flags.mark_flags_as_required(["name", "zone", "accelerator_type"])


class LaunchError(ValueError):
    """A launch that cannot go ahead; the message names the flag or step to change."""


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice as gcloud knows it."""

    name: str
    zone: str
    accelerator_type: str
    project: str | None = None
    version: str | None = None
    spot: bool = False
    queued: bool | None = None
    checkpoint_dir: str | None = None

    def __post_init__(self):
        match = re.fullmatch(r"(v4|v5litepod|v5p|v6e)-(\d+)", self.accelerator_type)
        if not match:
            hint = (" (gcloud calls v5e v5litepod)"
                    if self.accelerator_type.startswith("v5e") else "")
            raise LaunchError(f"--accelerator_type={self.accelerator_type!r}{hint}: give "
                              "GENERATION-SIZE as gcloud names it: v4-N, v5litepod-N, v5p-N "
                              "or v6e-N, e.g. v5p-16")
        generation = match.group(1)
        if self.version is None:
            object.__setattr__(self, "version", RUNTIME_VERSIONS[generation])
        if self.queued is None:
            object.__setattr__(self, "queued", generation in QUEUED_BY_DEFAULT)
        if self.checkpoint_dir is not None and not re.fullmatch(
                r"gs://.+/[A-Za-z0-9._-]+/?", self.checkpoint_dir):
            raise LaunchError(f"--checkpoint_dir={self.checkpoint_dir!r}: give the checkpoint's "
                              "directory in a bucket, e.g. gs://BUCKET/gemma-3-4b-it")

    @property
    def host_checkpoint(self) -> str | None:
        """Where setup copies --checkpoint_dir on every host (a shell word: $HOME expands)."""
        if self.checkpoint_dir is None:
            return None
        return f'"$HOME/checkpoints/{self.checkpoint_dir.rstrip("/").rsplit("/", 1)[1]}"'

    @property
    def reclaimed_states(self) -> tuple[str, ...]:
        return RECLAIMED_STATES["queued" if self.queued else "vm"]

    @property
    def multi_host(self) -> bool:
        return int(self.accelerator_type.rsplit("-", 1)[1]) > MAX_SINGLE_HOST_SIZE

    def gcloud(self, command: str, *args: str) -> list[str]:
        """`gcloud compute tpus COMMAND NAME --zone=ZONE [--project=PROJECT] ARGS`; `scp` takes
        its source and destination instead of the name, as the first two of `args`."""
        positional = list(args[:2]) if command.endswith("scp") else [self.name]
        rest = args[2:] if command.endswith("scp") else args
        return ["gcloud", "compute", "tpus", *command.split(), *positional,
                f"--zone={self.zone}", *([f"--project={self.project}"] if self.project else []),
                *rest]


# ---------------------------------------------------------------------------------------------
# The commands.


def create_command(s: Slice) -> list[str]:
    spot = ["--spot"] if s.spot else []
    if s.queued:
        return s.gcloud("queued-resources create", f"--node-id={s.name}",
                        f"--accelerator-type={s.accelerator_type}",
                        f"--runtime-version={s.version}", *spot)
    return s.gcloud("tpu-vm create", f"--accelerator-type={s.accelerator_type}",
                    f"--version={s.version}", *spot)


def state_command(s: Slice) -> list[str]:
    """Prints the queued resource's state (ACTIVE, SUSPENDED, ...) or the TPU VM's (READY,
    PREEMPTED, ...)."""
    if s.queued:
        return s.gcloud("queued-resources describe", "--format=value(state.state)")
    return vm_state_command(s)


def vm_state_command(s: Slice) -> list[str]:
    return s.gcloud("tpu-vm describe", "--format=value(state)")


def delete_command(s: Slice) -> list[str]:
    if s.queued:  # --force: its TPU VM too.
        return s.gcloud("queued-resources delete", "--force", "--quiet")
    return s.gcloud("tpu-vm delete", "--quiet")


def ssh_command(s: Slice, script: str) -> list[str]:
    """`script` run by every host's shell at once; their output comes back here."""
    return s.gcloud("tpu-vm ssh", "--worker=all", f"--command={script}")


def scp_command(s: Slice, archive: Path) -> list[str]:
    return s.gcloud("tpu-vm scp", str(archive), f"{s.name}:{ARCHIVE}", "--worker=all")


def archive_path(s: Slice) -> Path:
    return Path(tempfile.gettempdir()) / f"xmem-jax-{s.name}.tgz"


# The pid of the job a host runs, if it is running (the file `run` writes).
_JOB = (f'pid=$(cat "$HOME/{PID_FILE}" 2>/dev/null); '
        'if [ -n "$pid" ] && grep -qs xmem_jax "/proc/$pid/cmdline"; then')


def setup_script(s: Slice) -> str:
    """Replaces the code, keeps the environment, installs the pinned versions into it, and
    brings the checkpoint's copy up to date (rsync: only what changed)."""
    venv, uv = f"$HOME/{VENV_DIR}", "$HOME/.local/bin/uv"
    checkpoint = [] if s.checkpoint_dir is None else [
        f"mkdir -p {s.host_checkpoint}",
        f"gcloud storage rsync --recursive --quiet {shlex.quote(s.checkpoint_dir)} "
        f"{s.host_checkpoint}"]
    return "; ".join([
        "set -e",
        f'{_JOB} echo "$(hostname): a job is running (pid $pid): stop it first" >&2; exit 1; fi',
        f'rm -rf "$HOME/{CODE_DIR}"', f'mkdir "$HOME/{CODE_DIR}"',
        f'tar -xzf "$HOME/{ARCHIVE}" -C "$HOME/{CODE_DIR}"',
        f"python3 -m pip install --user --quiet uv=={UV_VERSION}",
        f'[ -x "{venv}/bin/python" ] || "{uv}" venv --quiet --python={PYTHON_VERSION} "{venv}"',
        f'cd "$HOME/{CODE_DIR}"',
        f'"{uv}" pip install --quiet --python="{venv}/bin/python" -c constraints.txt '
        '-e ".[tpu]"',
        *checkpoint,
        f'echo "$(hostname): jax $("{venv}/bin/python" -c "import jax; print(jax.__version__)")'
        ' installed"'])


def run_script(module: str, args: Sequence[str]) -> str:
    """Stops a job left over from an earlier run (a lost connection leaves it running), then
    runs `python -u -m module args` in its place, its pid in the file `stop` and `status`
    read. `args` are shell words (quoted where they need it)."""
    return "; ".join([
        f'{_JOB} kill "$pid"; while kill -0 "$pid" 2>/dev/null; do sleep 1; done; fi',
        f'cd "$HOME/{CODE_DIR}"', f'echo $$ > "$HOME/{PID_FILE}"',
        f'exec "$HOME/{VENV_DIR}/bin/python" -u -m {module} ' + " ".join(args)])


def stop_script() -> str:
    return (f'{_JOB} kill "$pid"; echo "$(hostname): stopped the job (pid $pid), which saves '
            'a checkpoint first"; else echo "$(hostname): no job running"; fi')


def status_script() -> str:
    return (f'{_JOB} echo "$(hostname): job running (pid $pid)"; '
            'else echo "$(hostname): no job running"; fi')


def workdir_of(job_args: Sequence[str]) -> str:
    workdirs = [arg.split("=", 1)[1] for arg in job_args if arg.startswith("--workdir=")]
    if not workdirs:
        raise LaunchError("run needs the job's --workdir=... after '--' (e.g. -- "
                          "--config=configs/default.py:gemma3_4b --workdir=gs://BUCKET/runs/x)")
    return workdirs[-1]


def job_command(s: Slice, job_args: Sequence[str], sweep_point: int | None
                ) -> tuple[str, list[str]]:
    """The module every host runs and its flags as shell words, checked: a multi-host slice
    needs a workdir that all hosts share, and gets --jax_distributed (the TPU VM's environment
    tells jax.distributed.initialize() the rest); with --checkpoint_dir, the model's checkpoint
    is the hosts' copy of it."""
    workdir = workdir_of(job_args)
    if s.multi_host and not workdir.startswith("gs://"):
        raise LaunchError(
            f"--workdir={workdir}: the hosts of a {s.accelerator_type} slice must share "
            "the workdir (each writes its part of every checkpoint there): give a gs:// path, "
            "e.g. --workdir=gs://BUCKET/runs/NAME")
    words = ["--jax_distributed"] if s.multi_host else []
    module, section = "xmem_jax.main", "config"
    if sweep_point is not None:
        module, section = "xmem_jax.sweep", "config.experiment"
        words.append(f"--point={sweep_point}")
    words += [shlex.quote(arg) for arg in job_args]
    if s.host_checkpoint:
        words.append(f"--{section}.model.checkpoint={s.host_checkpoint}")
    return module, words


# ---------------------------------------------------------------------------------------------
# Running them.


class Gcloud:
    """Runs commands, each echoed first; with `dry_run`, only prints them."""

    def __init__(self, dry_run: bool, out=None):
        self.dry_run = dry_run
        self.out = out or sys.stdout

    def note(self, text: str) -> None:
        print(f"# {text}", file=self.out, flush=True)

    def call(self, command: list[str]) -> int:
        print(("" if self.dry_run else "+ ") + shlex.join(command), file=self.out, flush=True)
        return 0 if self.dry_run else subprocess.call(command)

    def output(self, command: list[str]) -> str | None:
        """The command's stdout, stripped; None when it fails (its stderr passes through)."""
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        return done.stdout.strip() if done.returncode == 0 else None


def pack(archive: Path) -> int:
    """This checkout's files (tracked, and untracked but not ignored), and SOURCE_COMMIT naming
    its commit (provenance reads it where there is no git), into `archive`; returns the file
    count."""
    from xmem_jax import provenance

    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], cwd=REPO, check=True,
                                capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError) as error:
        raise LaunchError(f"setup packs the files of a git checkout of xmem-jax, and {REPO} is "
                          f"not one ({error})") from None
    names = [name for name in listed if name and (REPO / name).is_file()]
    with tarfile.open(archive, "w:gz") as tar:
        for name in names:
            tar.add(REPO / name, arcname=name)
        commit = provenance.source_commit().encode()
        info = tarfile.TarInfo(provenance.SOURCE_COMMIT_FILE)
        info.size = len(commit)
        tar.addfile(info, io.BytesIO(commit))
    return len(names)


def create(s: Slice, gcloud: Gcloud, poll_seconds: float = POLL_SECONDS,
           sleep: Callable[[float], None] = time.sleep) -> None:
    if gcloud.call(create_command(s)):
        raise LaunchError(f"Creating {s.name} failed (gcloud's message is above)")
    if not s.queued:  # tpu-vm create returns once the VM is READY.
        return
    if gcloud.dry_run:
        gcloud.note(f"then, every {poll_seconds:g} s until the state is ACTIVE:")
        gcloud.call(state_command(s))
        return
    last = None
    while (state := gcloud.output(state_command(s))) != "ACTIVE":
        if state in ("FAILED", *RECLAIMED_STATES["queued"]) or state is None:
            raise LaunchError(f"The queued resource {s.name} is {state or 'not found'}: "
                              "`delete`, then `create` again (another zone or --spot may have "
                              "capacity)")
        if state != last:
            print(f"{s.name}: {state} (waiting; Ctrl-C stops waiting, the request stays "
                  "queued until `delete`)", flush=True)
            last = state
        sleep(poll_seconds)
    print(f"{s.name}: ACTIVE", flush=True)


def setup(s: Slice, gcloud: Gcloud) -> None:
    archive = archive_path(s)
    if gcloud.dry_run:
        gcloud.note(f"pack this checkout's files (git ls-files) into {archive}, then:")
    else:
        print(f"Packed {pack(archive)} files of {REPO} into {archive}", flush=True)
    for command in (scp_command(s, archive), ssh_command(s, setup_script(s))):
        if gcloud.call(command):
            raise LaunchError(f"setup failed on {s.name} (the message is above); rerun it once "
                              "the cause is fixed: it starts over")


def reclaimed(s: Slice, gcloud: Gcloud) -> bool:
    state = gcloud.output(state_command(s))
    if state is None:
        raise LaunchError(f"No TPU {s.name} in {s.zone} (or gcloud cannot see it): `create` it "
                          "first")
    return state in s.reclaimed_states


def recreate(s: Slice, gcloud: Gcloud, **create_kwargs) -> None:
    if gcloud.call(delete_command(s)):
        raise LaunchError(f"Deleting the reclaimed {s.name} failed (the message is above)")
    create(s, gcloud, **create_kwargs)
    setup(s, gcloud)


def run(s: Slice, job_args: Sequence[str], gcloud: Gcloud, sweep_point: int | None = None,
        recreate_if_preempted: bool = False, **create_kwargs) -> int:
    """The job on every host; returns its exit code (0 when every host finished)."""
    module, args = job_command(s, job_args, sweep_point)
    command = ssh_command(s, run_script(module, args))
    if not workdir_of(job_args).startswith("gs://"):
        print("Note: the workdir is on the TPU VM's own disk, which is lost when the VM is "
              "deleted or reclaimed: copy the results off before `delete`", file=sys.stderr)
    if gcloud.dry_run:
        if recreate_if_preempted:
            gcloud.note(f"state: {' or '.join(s.reclaimed_states)} means reclaimed")
            gcloud.call(state_command(s))
            gcloud.note("if reclaimed: delete, create and set up again")
            recreate(s, gcloud, **create_kwargs)
        gcloud.note("the job, on every host:")
        gcloud.call(command)
        if recreate_if_preempted:
            gcloud.note("if the job fails: the state again, and if reclaimed, all from the delete "
                        "on again")
        return 0
    if recreate_if_preempted and reclaimed(s, gcloud):
        print(f"{s.name} was reclaimed: deleting it, creating it again, setting it up",
              flush=True)
        recreate(s, gcloud, **create_kwargs)
    while True:
        try:
            code = gcloud.call(command)
        except KeyboardInterrupt:
            gcloud.call(ssh_command(s, stop_script()))
            return 130
        if code == 0:
            return 0
        if not (recreate_if_preempted and reclaimed(s, gcloud)):
            print(f"The job failed (exit {code}; the hosts' logs are above). Rerunning `run` "
                  "resumes from the last checkpoint in the workdir.", file=sys.stderr)
            return code
        print(f"{s.name} was reclaimed during the run: deleting it, creating it again, setting "
              "it up, resuming", flush=True)
        recreate(s, gcloud, **create_kwargs)


def status(s: Slice, gcloud: Gcloud) -> int:
    if gcloud.dry_run:
        if s.queued:
            gcloud.call(state_command(s))
        gcloud.call(vm_state_command(s))
        gcloud.note("if READY:")
        return gcloud.call(ssh_command(s, status_script()))
    if s.queued:
        print(f"queued resource {s.name}: "
              f"{gcloud.output(state_command(s)) or 'not found'}", flush=True)
    state = gcloud.output(vm_state_command(s))
    print(f"TPU VM {s.name}: {state or 'not found'}", flush=True)
    return gcloud.call(ssh_command(s, status_script())) if state == "READY" else 0


def main(argv):
    if len(argv) < 2 or argv[1] not in SUBCOMMANDS:
        raise app.UsageError(f"Give a subcommand: {', '.join(SUBCOMMANDS)} (e.g. python -m "
                             "xmem_jax.launch create --name=... --zone=... "
                             "--accelerator_type=v5p-16)")
    subcommand, job_args = argv[1], argv[2:]
    if job_args and subcommand != "run":
        raise app.UsageError(f"{subcommand} takes no arguments after its flags; got "
                             f"{shlex.join(job_args)}")
    gcloud = Gcloud(_DRY_RUN.value)
    try:
        s = Slice(_NAME.value, _ZONE.value, _ACCELERATOR.value, _PROJECT.value, _VERSION.value,
                  _SPOT.value, _QUEUED.value, _CHECKPOINT_DIR.value)
        if subcommand == "create":
            create(s, gcloud)
        elif subcommand == "setup":
            setup(s, gcloud)
        elif subcommand == "run":
            sys.exit(run(s, job_args, gcloud, _SWEEP_POINT.value, _RECREATE.value))
        elif subcommand == "status":
            sys.exit(status(s, gcloud))
        elif subcommand == "stop":
            sys.exit(gcloud.call(ssh_command(s, stop_script())))
        else:
            sys.exit(gcloud.call(delete_command(s)))
    except LaunchError as error:
        sys.exit(f"launch {subcommand}: {error}")
    except KeyboardInterrupt:
        sys.exit(f"launch {subcommand}: interrupted")


if __name__ == "__main__":
    app.run(main)
