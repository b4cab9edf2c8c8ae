"""Several JAX processes on one machine, each with its own fake CPU devices and gloo
collectives: the start-up errors a user can act on."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from configs import default
from xmem_jax import distributed

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's 8 devices.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_processes(command, count: int, devices: int, *, timeout: float = 900,
                  log_dir: Path | None = None, port: int | None = None) -> list[tuple[int, str]]:
    """Runs `command` (argv) as `count` processes with `devices` CPU devices each (the
    distributed flags appended when count > 1); returns each one's (exit code, output)."""
    port = port or free_port()
    processes, outputs = [], []
    log_dir = log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
    for k in range(count):
        flags = [f"--num_cpu_devices={devices}"]
        if count > 1:
            flags += [f"--coordinator_address=localhost:{port}", f"--num_processes={count}",
                      f"--process_id={k}"]
        env = environment()
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


def main_job(*args):
    return [sys.executable, "-m", "xmem_jax.main", *args]


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
