"""Atomic writes with ordinary permissions, and output folders checked before any work is done."""

import os
from pathlib import Path

import pytest

from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.adapter.files import check_writable_file, check_writable_folder, write_text_atomically


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_get_the_mode_open_would_give(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = write_text_atomically(tmp_path / "card.md", "hello")
        with open(tmp_path / "plain.md", "w") as file:
            file.write("hello")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain.md").stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    def fail(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    from dreambooth_moslora.adapter.files import write_atomically

    with pytest.raises(RuntimeError):
        write_atomically(tmp_path / "x.safetensors", fail)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_to_be_created_is_judged_by_its_parent_and_not_created(tmp_path):
    target = tmp_path / "a" / "b"
    assert check_writable_folder(target, "--output_dir") == target
    assert not (tmp_path / "a").exists()


def test_an_output_folder_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(UserInputError, match="--output_dir .*taken is a file, not a folder"):
        check_writable_folder(tmp_path / "taken", "--output_dir")
    with pytest.raises(UserInputError, match="cannot be created: .*taken is a file"):
        check_writable_folder(tmp_path / "taken" / "sub", "--output_dir")


def test_an_unwritable_location_is_refused():
    with pytest.raises(UserInputError, match="is not writable"):
        check_writable_folder("/proc/self/out", "--output_dir")  # /proc refuses new files, even to root


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    with pytest.raises(UserInputError, match="not writable"):
        check_writable_folder(tmp_path / "ro" / "out", "--output_dir")


def test_a_file_target_must_not_be_a_folder(tmp_path):
    with pytest.raises(UserInputError, match="is a folder"):
        check_writable_file(tmp_path, "--output")
    assert check_writable_file(tmp_path / "x.safetensors", "--output") == tmp_path / "x.safetensors"


def test_a_folder_swap_interrupted_between_its_renames_gives_the_old_folder_back(tmp_path, monkeypatch):
    from dreambooth_moslora.adapter.files import write_folder_atomically

    def writer(text):
        return lambda staging: (staging / "step.json").write_text(text)

    def fail(staging):
        raise RuntimeError("disk full")

    write_folder_atomically(tmp_path / "best", writer("old"))
    rename = Path.rename

    def interrupted(self, target):
        if self.name == ".best.tmp":
            raise KeyboardInterrupt  # after best/ was moved aside, before the new one took its place
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_folder_atomically(tmp_path / "best", writer("new"))
    monkeypatch.undo()
    assert (tmp_path / "best" / "step.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]

    (tmp_path / "best").rename(tmp_path / ".best.old")  # a crash between the renames: only the old one is left
    with pytest.raises(RuntimeError):
        write_folder_atomically(tmp_path / "best", fail)
    assert (tmp_path / "best" / "step.json").read_text() == "old"
    write_folder_atomically(tmp_path / "best", writer("new"))
    assert (tmp_path / "best" / "step.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
