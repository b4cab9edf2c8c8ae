"""Several JAX processes on one machine, each with its own fake CPU devices and gloo
collectives, run the main job and the trainer as the hosts of a TPU slice do: the same results
as one process with as many devices, one checkpoint written by all, resumable under another
process count, shared files written once; and the start-up errors a user can act on."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from configs import default
from xmem_jax import distributed

ROOT = Path(__file__).resolve().parents[1]

# The :quick study cut to its stages' first steps (compiling is most of its time on a CPU):
# dataset, base, fine-tuning and development runs scored at steps 0, 2 and 4, the report.
STUDY = ["--config=configs/default.py:quick", "--config.control=False",
         "--config.base.num_steps=4", "--config.finetune.num_steps=4",
         "--config.base.optim.warmup_steps=1", "--config.finetune.optim.warmup_steps=1",
         "--config.base.log_every=1", "--config.finetune.log_every=1",
         "--config.base.progress_bar=False", "--config.finetune.progress_bar=False",
         "--config.base.checkpoint.every_steps=2", "--config.finetune.checkpoint.every_steps=2",
         "--config.eval_every=2"]

# Loaded at start-up by the subprocesses (first on PYTHONPATH): logs every file a process opens
# for writing or renames into place, so the test sees who writes what. Orbax's array data goes
# through tensorstore and is not logged; it is written by every process by design.
_SITECUSTOMIZE = '''
import builtins, io, os
_log = os.environ.get("XMEM_TEST_WRITE_LOG")
if _log:
    _open, _rename, _replace = io.open, os.rename, os.replace

    def _note(path):
        with _open(_log, "a") as f:
            f.write(os.path.abspath(os.fsdecode(path)) + "\\n")

    def _logged_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            _note(file)
        return _open(file, mode, *args, **kwargs)

    def _logged_rename(src, dst, *args, **kwargs):
        _note(dst)
        return _rename(src, dst, *args, **kwargs)

    def _logged_replace(src, dst, *args, **kwargs):
        _note(dst)
        return _replace(src, dst, *args, **kwargs)

    io.open = builtins.open = _logged_open
    os.rename, os.replace = _logged_rename, _logged_replace
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def environment(extra_path: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's 8 devices.
    env["PYTHONPATH"] = os.pathsep.join(
        [*([str(extra_path)] if extra_path else []), str(ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_processes(command, count: int, devices: int, *, timeout: float = 900,
                  write_logs: Path | None = None, log_dir: Path | None = None,
                  port: int | None = None) -> list[tuple[int, str]]:
    """Runs `command` (argv) as `count` processes with `devices` CPU devices each (the
    distributed flags appended when count > 1); returns each one's (exit code, output)."""
    port = port or free_port()
    hooks = None
    if write_logs is not None:
        hooks = write_logs / "hooks"
        hooks.mkdir(parents=True, exist_ok=True)
        (hooks / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    processes, outputs = [], []
    log_dir = log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
    for k in range(count):
        flags = [f"--num_cpu_devices={devices}"]
        if count > 1:
            flags += [f"--coordinator_address=localhost:{port}", f"--num_processes={count}",
                      f"--process_id={k}"]
        env = environment(hooks)
        if write_logs is not None:
            env["XMEM_TEST_WRITE_LOG"] = str(write_logs / f"process_{k}.txt")
        output = open(log_dir / f"output_{port}_{k}.txt", "w+")  # noqa: SIM115
        outputs.append(output)
        processes.append(subprocess.Popen([*command, *flags], cwd=ROOT, env=env, stdout=output,
                                          stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    results = []
    for process, output in zip(processes, outputs):
        output.seek(0)
        results.append((process.returncode, output.read()))
        output.close()
    return results


def check_ok(results) -> None:
    for k, (code, output) in enumerate(results):
        assert code == 0, f"process {k} exited with {code}:\n{output[-6000:]}"


def main_job(*args):
    return [sys.executable, "-m", "xmem_jax.main", *args]


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_close(a, b, where: str, rel: float) -> None:
    """Equal structure and values, numbers within `rel` (relative)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_close(a[key], b[key], f"{where}.{key}", rel)
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]", rel)
    elif isinstance(a, float) or isinstance(b, float):
        assert b == pytest.approx(a, rel=rel, abs=1e-12), where
    else:
        assert a == b, where


def assert_same_history(one: Path, many: Path) -> None:
    """Train rows: loss and gradient norm as close as a different summation order across
    processes allows; eval rows: the same recall (counts of queries)."""
    a, b = metrics(one), metrics(many)
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b], many
    for x, y in zip(a, b):
        where = f"{many} {x['kind']} step {x['step']}"
        if x["kind"] == "train":
            for key in ("loss", "grad_norm", "learning_rate", "loss_tokens", "tokens"):
                assert y[key] == pytest.approx(x[key], rel=1e-5), f"{where} {key}"
        else:
            assert_close(recall_of(x), recall_of(y), where, rel=1e-9)


def recall_of(results: dict) -> dict:
    """What a comparison across process counts checks: everything but run provenance (the
    config names the directories), the scoring cost counters and wall times."""
    skip = {"timings", "command", "commit", "config", "candidate_tokens", "kind", "step",
            "eval_seconds", "scoring_seconds"}
    if isinstance(results, dict):
        return {k: (_rounded(v) if k == "chance" else recall_of(v))
                for k, v in results.items() if k not in skip}
    if isinstance(results, list):
        return [recall_of(v) for v in results]
    return results


def _rounded(chance: dict) -> dict:
    """Chance levels to 7 digits: across processes their per-query terms (1 / candidates) are
    summed in float32 (the world names' 1/60 comes back as 0.0166666672), in one process in
    float64; the query counts and ranks stay exact."""
    return {k: round(v, 7) for k, v in chance.items()}


# ---------------------------------------------------------------------------------------------
# The main job: 2 processes x 4 devices against 1 process x 8 devices.


@pytest.fixture(scope="module")
def study_runs(tmp_path_factory):
    """The cut :quick study, once in 1 process with 8 devices and once in 2 processes with 4
    each (writes logged), on the same global mesh (data=8) and global batches."""
    root = tmp_path_factory.mktemp("multihost_study")
    runs = {}
    for name, count, devices in (("one", 1, 8), ("two", 2, 4)):
        directory = root / name
        directory.mkdir()
        start = time.perf_counter()
        results = run_processes(
            main_job(*STUDY, f"--workdir={directory / 'run'}",
                     f"--config.cache_dir={directory / 'cache'}"),
            count, devices, write_logs=directory / "writes", log_dir=directory)
        check_ok(results)
        runs[name] = directory
        print(f"{name}: {count} x {devices} devices, {time.perf_counter() - start:.0f} s")
    return runs


@pytest.mark.slow
def test_two_processes_match_one_process(study_runs):
    one, two = study_runs["one"], study_runs["two"]
    logs = sorted(p.relative_to(one) for p in one.rglob("metrics.jsonl"))
    assert len(logs) == 3  # Base, fine-tuning, development.
    assert logs == sorted(p.relative_to(two) for p in two.rglob("metrics.jsonl"))
    for log in logs:
        assert_same_history(one / log, two / log)
    a = json.loads((one / "run" / "results.json").read_text())
    b = json.loads((two / "run" / "results.json").read_text())
    assert [p["step"] for p in a["curves"]] == [0, 2, 4]
    assert_close(recall_of(a), recall_of(b), "results.json", rel=1e-9)


@pytest.mark.slow
def test_only_process_0_writes_the_shared_files(study_runs):
    """Results, report, plot, metrics, the dataset and the base's recall: process 0 alone.
    Process 1 writes only its parts of the checkpoints."""
    two = study_runs["two"]
    written = {k: [line for line in (two / "writes" / f"process_{k}.txt").read_text().split()
                   if line.startswith(str(two / "run")) or line.startswith(str(two / "cache"))]
               for k in (0, 1)}
    names = {Path(p).name for p in written[0]}
    assert {"results.json", "report.md", "curves.png", "metrics.jsonl",
            "dataset_info.json"} <= names
    assert any(Path(p).name.startswith("base_recall_") for p in written[0])
    others = [p for p in written[1] if "/checkpoints/" not in p]
    assert not others, others
    assert any("/checkpoints/" in p for p in written[1])  # Its iterator state.
    assert not list(two.rglob(".xmem_shared_*"))  # The shared-directory check cleans up.


@pytest.mark.slow
def test_finished_runs_reload_under_the_other_process_count(study_runs, tmp_path):
    """Each workdir rerun under the other process count restores every stage's final
    checkpoint (2 processes' in 1 process with 8 devices, and the reverse) and reports the
    same results: a user who changes slice size keeps their run."""
    for name, count, devices in (("two", 1, 8), ("one", 2, 4)):
        directory = tmp_path / name
        shutil.copytree(study_runs[name], directory, symlinks=True,
                        ignore=shutil.ignore_patterns("writes", "output_*"))
        before = json.loads((directory / "run" / "results.json").read_text())
        check_ok(run_processes(
            main_job(*STUDY, f"--workdir={directory / 'run'}",
                     f"--config.cache_dir={directory / 'cache'}"),
            count, devices, log_dir=tmp_path))
        after = json.loads((directory / "run" / "results.json").read_text())
        assert_close(recall_of(before), recall_of(after), f"{name} rerun", rel=0)
        for log in directory.rglob("metrics.jsonl"):  # No step was trained again.
            assert [r["step"] for r in metrics(log)] == [
                r["step"] for r in metrics(study_runs[name] / log.relative_to(directory))]


# ---------------------------------------------------------------------------------------------
# The trainer: a run killed mid-way resumes in 2 processes, in 1, and the reverse.


def worker(workdir: Path, data_dir: Path, *flags):
    return [sys.executable, str(ROOT / "tests" / "multihost_worker.py"),
            f"--workdir={workdir}", f"--data_dir={data_dir}", *flags]


@pytest.mark.slow
def test_killed_runs_resume_under_any_process_count(persona_dataset_dir, tmp_path):
    """Killed (SIGKILL) after step 3, the checkpoint at step 2 on disk: resumed in 2 processes,
    in 1 process with 8 devices from the 2 processes' checkpoint, and in 2 from 1's, each
    ends with the uninterrupted run's metrics at every step (data stream included)."""
    timings = {}

    def run(name, count, devices, *flags):
        start = time.perf_counter()
        cache = f"--compilation_cache={tmp_path / f'xla_{count}'}"
        results = run_processes(worker(tmp_path / name, persona_dataset_dir, cache, *flags),
                                count, devices, log_dir=tmp_path)
        timings[f"{name} in {count}{' (killed)' if flags else ''}"] = (
            time.perf_counter() - start)
        return results

    check_ok(run("full", 1, 8))
    for name, count, devices in (("cut_two", 2, 4), ("cut_one", 1, 8)):
        results = run(name, count, devices, "--kill_at_step=3")
        assert all(code == -9 for code, _ in results), results
        steps = sorted(int(p.name) for p in (tmp_path / name / "checkpoints").iterdir()
                       if p.name.isdigit())
        assert steps == [2]
    saved = tmp_path / "cut_two" / "checkpoints" / "2" / "data"
    assert sorted(p.name for p in saved.glob("process_*")) == ["process_0-of-2.json",
                                                               "process_1-of-2.json"]
    shutil.copytree(tmp_path / "cut_two", tmp_path / "cut_two_in_one")
    for name, count, devices in (("cut_two", 2, 4), ("cut_two_in_one", 1, 8),
                                 ("cut_one", 2, 4)):
        check_ok(run(name, count, devices))
        assert_same_history(tmp_path / "full" / "metrics.jsonl",
                            tmp_path / name / "metrics.jsonl")
    print("seconds:", {k: round(v) for k, v in timings.items()})


# ---------------------------------------------------------------------------------------------
# Errors a user can act on.


def test_process_id_out_of_range_names_the_flags():
    with pytest.raises(ValueError, match=r"--process_id=2 is out of range for "
                                         r"--num_processes=2: ids run from 0 to 1"):
        distributed.initialize("localhost:1234", 2, 2)
    with pytest.raises(ValueError, match="--process_id missing"):
        distributed.initialize("localhost:1234", 2, None)
    with pytest.raises(ValueError, match="--coordinator_address='localhost' must be HOST:PORT"):
        distributed.initialize("localhost", 2, 0)


def test_unreachable_coordinator_times_out_naming_the_address():
    port = free_port()  # Nobody listens there.
    start = time.perf_counter()
    with pytest.raises(distributed.CoordinatorUnreachableError,
                       match=f"coordinator at --coordinator_address=localhost:{port} did not "
                             "answer within 1 s"):
        distributed.initialize(f"localhost:{port}", 2, 1, timeout_s=1)
    assert time.perf_counter() - start < 10


def test_coordinator_waiting_for_missing_processes_names_the_address(tmp_path):
    """Process 0 alone: after the timeout it exits with a message, not JAX's bare abort."""
    port = free_port()
    [(code, output)] = run_processes(
        main_job("--config=configs/default.py:quick", f"--workdir={tmp_path}",
                 f"--coordinator_address=localhost:{port}", "--num_processes=2",
                 "--process_id=0", "--initialization_timeout=3"),
        1, 1, timeout=120, log_dir=tmp_path, port=port)
    assert code == 1
    assert f"could not connect to 2 processes through the coordinator at localhost:{port}" \
        in output


def test_batch_sizes_that_do_not_split_over_the_processes():
    config = default.get_config("quick")  # Batches of 16 (base, fine-tuning), 32 (scoring).
    distributed.check_batch_sizes(config, 2)
    with pytest.raises(ValueError, match=r"config.base.batch_size=16, config.eval_batch_size=32, "
                                         r"config.finetune.batch_size=16 not divisible by the 3 "
                                         r"processes.*\(e.g. config.base.batch_size=18\)"):
        distributed.check_batch_sizes(config, 3)


def test_workdirs_the_processes_do_not_share_are_reported(tmp_path):
    """Each process given its own directory (as on hosts without a shared filesystem): both
    stop before doing anything, naming the directory."""
    port = free_port()
    command = [sys.executable, "-c", f"""
import sys
from xmem_jax import distributed
k = int(sys.argv[-1].split("=")[1])
distributed.initialize("localhost:{port}", 2, k, num_cpu_devices=1, timeout_s=60)
distributed.check_shared({{"--workdir": "{tmp_path}/host_" + str(k)}})
"""]
    results = run_processes(command, 2, 1, timeout=120, log_dir=tmp_path, port=port)
    for code, output in results:
        assert code != 0
        assert ("The processes do not share their directories: process 1 does not see the file "
                f"process 0 wrote in --workdir={tmp_path}/host_0 (its --workdir is "
                f"{tmp_path}/host_1)") in output, output[-3000:]
    assert not list(tmp_path.rglob(".xmem_shared_*"))


def test_a_failed_build_on_process_0_stops_the_others_naming_its_error(tmp_path):
    """Process 0 builds a cache (the dataset), the others wait: if it fails, they raise too,
    with its error, instead of waiting for a cache that never comes."""
    port = free_port()
    command = [sys.executable, "-c", f"""
import sys
from xmem_jax import distributed
k = int(sys.argv[-1].split("=")[1])
distributed.initialize("localhost:{port}", 2, k, num_cpu_devices=1, timeout_s=60)

def build():
    raise OSError("disk full")

distributed.primary_first(build, what="dataset {tmp_path}/data")
"""]
    (code0, output0), (code1, output1) = run_processes(command, 2, 1, timeout=120,
                                                       log_dir=tmp_path, port=port)
    assert code0 != 0 and "OSError: disk full" in output0
    assert code1 != 0
    assert f"Process 0 failed (dataset {tmp_path}/data): OSError: disk full" in output1
