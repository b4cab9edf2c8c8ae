"""The Cloud TPU launcher without a cloud: every subcommand's --dry_run commands for a single-host
(v5p-8) and a multi-host (v5p-16) slice, the flows (waiting for a queued resource, recreating a
reclaimed spot slice, a failed job) against a fake gcloud, the scripts every host runs (with
bash, in a temporary home), and what `setup` packs."""

import io
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from xmem_jax import launch, provenance

REPO = Path(__file__).resolve().parents[1]
ZONE = "us-east5-a"
JOB = ["--config=configs/default.py:gemma3_4b", "--config.model.checkpoint=/mnt/gemma-3-4b-it",
       "--workdir=gs://my-bucket/runs/gemma3_4b"]
GCLOUD = "gcloud compute tpus"
QR = f"{GCLOUD} queued-resources"
SSH = f"{GCLOUD} tpu-vm ssh xmem --zone={ZONE} --worker=all"
JOB_PID = ('pid=$(cat "$HOME/xmem-jax.pid" 2>/dev/null); if [ -n "$pid" ] && grep -qs xmem_jax '
           '"/proc/$pid/cmdline"; then')
ARCHIVE = launch.archive_path(launch.Slice("xmem", ZONE, "v5p-8"))
SETUP = (f"{GCLOUD} tpu-vm scp {ARCHIVE} "
         f"xmem:xmem-jax.tgz --zone={ZONE} --worker=all\n"
         f"{SSH} '--command=set -e; {JOB_PID} echo \"$(hostname): a job is running (pid $pid): "
         "stop it first\" >&2; exit 1; fi; rm -rf \"$HOME/xmem-jax\"; mkdir \"$HOME/xmem-jax\"; "
         "tar -xzf \"$HOME/xmem-jax.tgz\" -C \"$HOME/xmem-jax\"; python3 -m pip install --user "
         "--quiet uv==0.13.9; [ -x \"$HOME/xmem-jax-venv/bin/python\" ] || "
         "\"$HOME/.local/bin/uv\" venv --quiet --python=3.11 \"$HOME/xmem-jax-venv\"; "
         "cd \"$HOME/xmem-jax\"; \"$HOME/.local/bin/uv\" pip install --quiet "
         "--python=\"$HOME/xmem-jax-venv/bin/python\" -c constraints.txt -e \".[tpu]\"; "
         "echo \"$(hostname): jax $(\"$HOME/xmem-jax-venv/bin/python\" -c \"import jax; "
         "print(jax.__version__)\") installed\"'")
STOP_AND_START = (f"{JOB_PID} kill \"$pid\"; while kill -0 \"$pid\" 2>/dev/null; do sleep 1; "
                  "done; fi; cd \"$HOME/xmem-jax\"; echo $$ > \"$HOME/xmem-jax.pid\"; exec "
                  "\"$HOME/xmem-jax-venv/bin/python\" -u -m")


def dry_run(subcommand: str, accelerator: str, *args: str) -> str:
    """What `python -m xmem_jax.launch SUBCOMMAND --dry_run` prints."""
    done = subprocess.run(
        [sys.executable, "-m", "xmem_jax.launch", subcommand, "--name=xmem", f"--zone={ZONE}",
         f"--accelerator_type={accelerator}", "--dry_run", *args], cwd=REPO, text=True,
        capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("accelerator", ["v5p-8", "v5p-16"])
def test_dry_run_prints_every_subcommands_gcloud_commands(accelerator):
    distributed = "--jax_distributed " if accelerator == "v5p-16" else ""
    job = " ".join(JOB)
    create = (f"{QR} create xmem --zone={ZONE} --node-id=xmem --accelerator-type={accelerator} "
              "--runtime-version=v2-alpha-tpuv5 --spot\n"
              "# then, every 60 s until the state is ACTIVE:\n"
              f"{QR} describe xmem --zone={ZONE} '--format=value(state.state)'\n")
    pack = f"# pack this checkout's files (git ls-files) into {ARCHIVE}, then:\n"
    assert dry_run("create", accelerator, "--spot") == create
    assert dry_run("setup", accelerator) == pack + SETUP + "\n"
    assert dry_run("run", accelerator, "--", *JOB) == (
        "# the job, on every host:\n"
        f"{SSH} '--command={STOP_AND_START} xmem_jax.main {distributed}{job}'\n")
    assert dry_run("run", accelerator, "--spot", "--recreate_if_preempted", "--", *JOB) == (
        "# state: SUSPENDING or SUSPENDED means reclaimed\n"
        f"{QR} describe xmem --zone={ZONE} '--format=value(state.state)'\n"
        "# if reclaimed: delete, create and set up again\n"
        f"{QR} delete xmem --zone={ZONE} --force --quiet\n" + create + pack + SETUP + "\n"
        "# the job, on every host:\n"
        f"{SSH} '--command={STOP_AND_START} xmem_jax.main {distributed}{job}'\n"
        "# if the job fails: the state again, and if reclaimed, all from the delete on again\n")
    assert dry_run("run", accelerator, "--sweep_point=2", "--",
                   "--config=configs/sweeps/persona_counts.py:gemma3_4b",
                   "--workdir=gs://my-bucket/sweep") == (
        "# the job, on every host:\n"
        f"{SSH} '--command={STOP_AND_START} xmem_jax.sweep {distributed}--point=2 "
        "--config=configs/sweeps/persona_counts.py:gemma3_4b --workdir=gs://my-bucket/sweep'\n")
    assert dry_run("status", accelerator) == (
        f"{QR} describe xmem --zone={ZONE} '--format=value(state.state)'\n"
        f"{GCLOUD} tpu-vm describe xmem --zone={ZONE} '--format=value(state)'\n"
        "# if READY:\n"
        f"{SSH} '--command={JOB_PID} echo \"$(hostname): job running (pid $pid)\"; "
        "else echo \"$(hostname): no job running\"; fi'\n")
    assert dry_run("stop", accelerator) == (
        f"{SSH} '--command={JOB_PID} kill \"$pid\"; echo \"$(hostname): stopped the job "
        "(pid $pid), which saves a checkpoint first\"; else echo \"$(hostname): no job "
        "running\"; fi'\n")
    assert dry_run("delete", accelerator) == f"{QR} delete xmem --zone={ZONE} --force --quiet\n"


def test_plain_tpu_vm_on_demand_with_a_project_and_version():
    s = launch.Slice("xmem", ZONE, "v4-32", project="proj", queued=False)
    assert s.version == "tpu-ubuntu2204-base" and s.multi_host
    assert shlex.join(launch.create_command(s)) == (
        f"{GCLOUD} tpu-vm create xmem --zone={ZONE} --project=proj --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base")
    assert shlex.join(launch.state_command(s)) == (
        f"{GCLOUD} tpu-vm describe xmem --zone={ZONE} --project=proj '--format=value(state)'")
    assert shlex.join(launch.delete_command(s)) == (
        f"{GCLOUD} tpu-vm delete xmem --zone={ZONE} --project=proj --quiet")
    assert s.reclaimed_states == ("PREEMPTED", "TERMINATED")


@pytest.mark.parametrize("accelerator, version, queued, multi_host", [
    ("v5litepod-8", "v2-alpha-tpuv5-lite", True, False),
    ("v5litepod-16", "v2-alpha-tpuv5-lite", True, True),
    ("v6e-8", "v2-alpha-tpuv6e", True, False), ("v6e-64", "v2-alpha-tpuv6e", True, True),
    ("v5p-128", "v2-alpha-tpuv5", True, True), ("v4-8", "tpu-ubuntu2204-base", False, False)])
def test_defaults_by_generation(accelerator, version, queued, multi_host):
    s = launch.Slice("xmem", ZONE, accelerator)
    assert (s.version, s.queued, s.multi_host) == (version, queued, multi_host)


@pytest.mark.parametrize("accelerator, message", [
    ("v5e-16", r"--accelerator_type='v5e-16' \(gcloud calls v5e v5litepod\): give "),
    ("v5p16", "--accelerator_type='v5p16': give GENERATION-SIZE as gcloud names it"),
    ("tpu-v7", "v4-N, v5litepod-N, v5p-N or v6e-N, e.g. v5p-16")])
def test_unknown_accelerator_type_names_the_flag(accelerator, message):
    with pytest.raises(launch.LaunchError, match=message):
        launch.Slice("xmem", ZONE, accelerator)


def test_run_needs_a_workdir_and_a_bucket_on_several_hosts():
    with pytest.raises(launch.LaunchError, match="run needs the job's --workdir=... after '--'"):
        launch.job_command(launch.Slice("xmem", ZONE, "v5p-8"), ["--config=c"], None)
    with pytest.raises(launch.LaunchError, match="--workdir=runs/x: the hosts of a v5p-16 "
                                                 "slice must share the workdir.*gs://"):
        launch.job_command(launch.Slice("xmem", ZONE, "v5p-16"), ["--workdir=runs/x"], None)
    # One host may keep it on its own disk (run warns that the disk goes with the VM).
    assert launch.job_command(launch.Slice("xmem", ZONE, "v5p-8"), ["--workdir=runs/x"],
                              None) == ("xmem_jax.main", ["--workdir=runs/x"])


def test_checkpoint_dir_is_copied_to_every_host_and_given_to_the_job():
    s = launch.Slice("xmem", ZONE, "v5p-16", checkpoint_dir="gs://my-bucket/gemma-3-4b-it/")
    assert ('mkdir -p "$HOME/checkpoints/gemma-3-4b-it"; gcloud storage rsync --recursive '
            '--quiet gs://my-bucket/gemma-3-4b-it/ "$HOME/checkpoints/gemma-3-4b-it"; echo'
            in launch.setup_script(s))
    assert launch.job_command(s, ["--workdir=gs://b/r"], None) == ("xmem_jax.main", [
        "--jax_distributed", "--workdir=gs://b/r",
        '--config.model.checkpoint="$HOME/checkpoints/gemma-3-4b-it"'])
    assert launch.job_command(s, ["--workdir=gs://b/s"], 1) == ("xmem_jax.sweep", [
        "--jax_distributed", "--point=1", "--workdir=gs://b/s",
        '--config.experiment.model.checkpoint="$HOME/checkpoints/gemma-3-4b-it"'])
    with pytest.raises(launch.LaunchError, match="--checkpoint_dir='/mnt/gemma': give the "
                                                 "checkpoint's directory in a bucket"):
        launch.Slice("xmem", ZONE, "v5p-16", checkpoint_dir="/mnt/gemma")


def test_subcommand_errors_name_what_to_give():
    base = [sys.executable, "-m", "xmem_jax.launch"]
    flags = ["--name=xmem", f"--zone={ZONE}", "--accelerator_type=v5p-16", "--dry_run"]
    for args, message in [(flags, "Give a subcommand: create, setup, run, status, stop, "
                                  "delete"),
                          (["delete", *flags, "--", "--workdir=x"],
                           "delete takes no arguments after its flags"),
                          (["run", *flags, "--", "--workdir=runs/x"],
                           "launch run: --workdir=runs/x: the hosts of a v5p-16 slice")]:
        done = subprocess.run(base + args, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and message in done.stdout + done.stderr


class FakeGcloud(launch.Gcloud):
    """Records the commands; `describe` answers the next of `states`, calls the next of
    `codes` (0 once they run out)."""

    def __init__(self, states=(), codes=()):
        super().__init__(dry_run=False, out=io.StringIO())
        self.states, self.codes, self.commands = list(states), list(codes), []

    def call(self, command):
        self.commands.append(command[3:5])  # e.g. ['tpu-vm', 'ssh']
        return self.codes.pop(0) if self.codes else 0

    def output(self, command):
        self.commands.append(command[3:5])
        return self.states.pop(0)


@pytest.fixture
def no_pack(monkeypatch):
    monkeypatch.setattr(launch, "pack", lambda archive: 0)


def test_create_waits_until_the_queued_resource_is_active(capsys):
    gcloud, naps = FakeGcloud(["WAITING_FOR_RESOURCES", "WAITING_FOR_RESOURCES", "PROVISIONING",
                               "ACTIVE"]), []
    launch.create(launch.Slice("xmem", ZONE, "v5p-16", spot=True), gcloud, sleep=naps.append)
    assert gcloud.commands == [["queued-resources", "create"]] + [
        ["queued-resources", "describe"]] * 4
    assert naps == [60] * 3
    assert capsys.readouterr().out.splitlines() == [
        "xmem: WAITING_FOR_RESOURCES (waiting; Ctrl-C stops waiting, the request stays queued "
        "until `delete`)",
        "xmem: PROVISIONING (waiting; Ctrl-C stops waiting, the request stays queued until "
        "`delete`)", "xmem: ACTIVE"]
    with pytest.raises(launch.LaunchError, match="The queued resource xmem is FAILED: `delete`, "
                                                 "then `create` again"):
        launch.create(launch.Slice("xmem", ZONE, "v5p-16"), FakeGcloud(["FAILED"]),
                      sleep=naps.append)


def test_run_recreates_a_reclaimed_spot_slice_before_and_during_the_run(no_pack):
    s = launch.Slice("xmem", ZONE, "v5p-16", spot=True)
    # Reclaimed before the run: recreated and set up; the job then dies with the slice
    # reclaimed again: recreated again, and the rerun finishes.
    gcloud = FakeGcloud(states=["SUSPENDED", "ACTIVE", "SUSPENDED", "ACTIVE"],
                        codes=[0, 0, 0, 0, 255])
    assert launch.run(s, JOB, gcloud, recreate_if_preempted=True, sleep=lambda _: None) == 0
    recreate = [["queued-resources", "delete"], ["queued-resources", "create"],
                ["queued-resources", "describe"], ["tpu-vm", "scp"], ["tpu-vm", "ssh"]]
    assert gcloud.commands == [
        ["queued-resources", "describe"], *recreate, ["tpu-vm", "ssh"],
        ["queued-resources", "describe"], *recreate, ["tpu-vm", "ssh"]]


def test_a_failed_job_on_a_live_slice_returns_its_code_with_a_resume_hint(capsys):
    s = launch.Slice("xmem", ZONE, "v5p-16", spot=True)
    gcloud = FakeGcloud(states=["ACTIVE", "ACTIVE"], codes=[1])
    assert launch.run(s, JOB, gcloud, recreate_if_preempted=True) == 1
    assert gcloud.commands == [["queued-resources", "describe"], ["tpu-vm", "ssh"],
                               ["queued-resources", "describe"]]
    assert ("The job failed (exit 1; the hosts' logs are above). Rerunning `run` resumes from "
            "the last checkpoint") in capsys.readouterr().err
    # Without --recreate_if_preempted nothing is described: the job runs once.
    gcloud = FakeGcloud(codes=[3])
    assert launch.run(s, JOB, gcloud) == 3 and gcloud.commands == [["tpu-vm", "ssh"]]
    with pytest.raises(launch.LaunchError, match="No TPU xmem in us-east5-a"):
        launch.run(s, JOB, FakeGcloud(states=[None]), recreate_if_preempted=True)


def test_ctrl_c_stops_the_job_on_every_host():
    class Interrupted(FakeGcloud):
        def call(self, command):
            super().call(command)
            if len(self.commands) == 1:
                raise KeyboardInterrupt
            self.stop_script = command[-1]
            return 0

    gcloud = Interrupted()
    assert launch.run(launch.Slice("xmem", ZONE, "v5p-16"), JOB, gcloud) == 130
    assert gcloud.commands == [["tpu-vm", "ssh"]] * 2
    assert gcloud.stop_script == f"--command={launch.stop_script()}"


def bash(script: str, home: Path) -> str:
    done = subprocess.run(["bash", "-c", script], env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_host_scripts_run_stop_and_report_the_job(tmp_path):
    """run_script starts the job with its pid in the file, replacing one still running;
    status_script and stop_script find it by that file (never another process)."""
    (tmp_path / "xmem-jax").mkdir()
    fake_python = tmp_path / "xmem-jax-venv" / "bin" / "python"
    fake_python.parent.mkdir(parents=True)
    # Stands in for the job: runs until SIGTERM, writing its arguments.
    fake_python.write_text('#!/bin/bash\necho "$@" >> "$HOME/args"\n'
                           'trap \'kill $!; exit 0\' TERM\nsleep 60 & wait\n')
    fake_python.chmod(0o755)
    hostname = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    assert bash(launch.status_script(), tmp_path) == f"{hostname}: no job running\n"

    module, words = launch.job_command(
        launch.Slice("xmem", ZONE, "v5p-8", checkpoint_dir="gs://b/gemma-3-4b-it"),
        ["--workdir=gs://b/r", "--note=a b"], None)

    def start():
        script = launch.run_script(module, words)
        return subprocess.Popen(["bash", "-c", script], env={"HOME": str(tmp_path),
                                                              "PATH": "/usr/bin:/bin"})

    first = start()
    for _ in range(100):
        if "running" in bash(launch.status_script(), tmp_path) and (tmp_path / "args").exists():
            break
        time.sleep(0.05)
    pid = int((tmp_path / "xmem-jax.pid").read_text())
    assert pid == first.pid
    assert bash(launch.status_script(), tmp_path) == f"{hostname}: job running (pid {pid})\n"
    second = start()  # Stops the first, then takes its place.
    assert first.wait(10) == 0
    for _ in range(100):
        if int((tmp_path / "xmem-jax.pid").read_text()) == second.pid:
            break
        time.sleep(0.05)
    assert bash(launch.stop_script(), tmp_path) == (
        f"{hostname}: stopped the job (pid {second.pid}), which saves a checkpoint first\n")
    assert second.wait(10) == 0
    assert bash(launch.stop_script(), tmp_path) == f"{hostname}: no job running\n"
    assert (tmp_path / "args").read_text().splitlines()[0] == (
        "-u -m xmem_jax.main --workdir=gs://b/r --note=a b "
        f"--config.model.checkpoint={tmp_path}/checkpoints/gemma-3-4b-it")


def test_pack_ships_the_checkout_without_ignored_files_and_names_its_commit(tmp_path):
    archive = tmp_path / "code.tgz"
    count = launch.pack(archive)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        commit = tar.extractfile(provenance.SOURCE_COMMIT_FILE).read().decode()
    assert len(names) == count + 1
    assert {"constraints.txt", "pyproject.toml", "xmem_jax/launch.py",
            "configs/default.py"} <= set(names)
    assert not [n for n in names if n.startswith((".venv/", "runs/", ".git/"))
                or "__pycache__" in n]
    assert commit == provenance.source_commit() and commit


def test_provenance_reads_the_packed_commit_outside_git(tmp_path, monkeypatch):
    package = tmp_path / "xmem_jax"
    package.mkdir()
    (tmp_path / provenance.SOURCE_COMMIT_FILE).write_text("abc1234+\n")
    monkeypatch.setattr(provenance, "__file__", str(package / "provenance.py"))
    provenance.source_commit.cache_clear()  # Read once per process: read it again here.
    try:
        assert provenance.source_commit() == "abc1234+"
    finally:
        provenance.source_commit.cache_clear()
