"""One run per output folder: a second is refused, a dead run's lock is taken over, the lock goes with the run."""

import json
import os
import socket
import subprocess
import sys

import pytest

from dreambooth_moslora.errors import UserInputError
from dreambooth_moslora.output_lock import LOCK_FILE, output_folder_lock


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
