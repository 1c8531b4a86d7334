"""One run per output folder: a second is refused (in this process or another), a lock nobody holds is taken over,
the lock goes with the run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.trainer.output_lock import LOCK_FILE, output_folder_lock

HOLD = """
import sys
from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.trainer.output_lock import output_folder_lock
try:
    with output_folder_lock(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.readline()
except UserInputError:
    print("refused", flush=True)
"""


def start_holder(folder) -> subprocess.Popen:
    """A process that holds the folder's lock until its stdin closes or it is killed (or prints that it is refused)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)


def hold_in_another_process(folder) -> subprocess.Popen:
    child = start_holder(folder)
    assert child.stdout.readline() == "held\n"
    return child


def test_a_second_run_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "out"
    with output_folder_lock(out):
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(UserInputError, match=rf"in use by another training run \(PID {os.getpid()} on "):
            with output_folder_lock(out):
                pass
        assert (out / LOCK_FILE).exists()  # the refused run did not release the first run's lock
    assert not (out / LOCK_FILE).exists()


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with output_folder_lock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_lock_from_another_host_is_trusted(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "another-machine"}))
    with pytest.raises(UserInputError, match="another-machine"):
        with output_folder_lock(tmp_path):
            pass


def test_released_on_error_and_a_folder_it_created_empty_is_removed(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with output_folder_lock(tmp_path / "new"):
            raise KeyboardInterrupt
    assert not (tmp_path / "new").exists()
    with output_folder_lock(tmp_path / "kept"):
        (tmp_path / "kept" / "moslora.safetensors").write_text("x")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["moslora.safetensors"]


def test_disabled_on_other_processes(tmp_path):
    with output_folder_lock(tmp_path / "out", enabled=False):
        assert not (tmp_path / "out").exists()


def test_a_run_in_another_process_is_refused_until_it_dies_and_its_lock_is_taken(tmp_path):
    child = hold_in_another_process(tmp_path)
    try:
        with pytest.raises(UserInputError, match=rf"in use by another training run \(PID {child.pid} on "):
            with output_folder_lock(tmp_path):
                pass
    finally:
        child.kill()
        child.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == child.pid  # killed: the file is left behind
    with output_folder_lock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_lock_file_naming_a_live_process_that_does_not_hold_it_is_taken(tmp_path):
    """A dead run's PID reused by another process (as after a container restart) does not keep the folder locked."""
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with output_folder_lock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(UserInputError, match="in use by another training run"):
            with output_folder_lock(tmp_path):
                pass


def test_processes_racing_for_a_dead_runs_lock_get_it_once(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    children = [start_holder(tmp_path) for _ in range(4)]
    try:
        assert sorted(child.stdout.readline() for child in children) == ["held\n"] + ["refused\n"] * 3
    finally:
        for child in children:
            child.kill()
            child.wait()
