"""A job's state, progress and cancellation, read from and sent to its folder and its process, without a server."""

import json
import os
import subprocess
import sys
import time
from argparse import Namespace

import pytest

from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.ui.jobs import START_MARK, JobStore
from dreambooth_moslora.ui.progress import training_progress


def new_job(store: JobStore) -> str:
    return store.create("a job", lambda photos: photos.mkdir(), lambda photos, output: ["--output_dir", output],
                        lambda argv: None)


NO_VALIDATION = Namespace(validation_prompt=None, validation_steps=None)


def bar_line(step: int, total: int, seconds: float, loss: float = 0.1) -> str:
    """The training loop's tqdm line, as train.log holds it."""
    return (f"\rsteps:  {100 * step // total}%|█         | {step}/{total} [00:01<00:20,  {1 / seconds:.2f}it/s, "
            f"loss={loss:.4f}, lr=1.00e-03, s_per_step={seconds:.2f}]")


def test_the_progress_is_read_from_the_bar_in_the_log(tmp_path):
    log = tmp_path / "train.log"
    assert training_progress(log, NO_VALIDATION, tmp_path)["total"] is None
    log.write_text("caching latents: 100%|██| 25/25 [00:00<00:00, 118.25it/s]\n"
                   "\rsteps:   0%|          | 0/20 [00:00<?, ?it/s]"
                   "\rsteps:   5%|▌         | 1/20 [00:00<00:02,  7.83it/s, loss=0.5000, lr=1.00e-03, s_per_step=0.13]"
                   "\rsteps:  10%|█         | 2/20 [00:01<00:20,  1.50s/it, loss=0.2500, lr=1.00e-03, s_per_step=1.5]"
                   "\rsteps:  15%|█         | 3/20 [00:01<00:20,  1.50s/it, loss=0.1250, lr=1.00e-03, s_per_step=0.5]")
    progress = training_progress(log, NO_VALIDATION, tmp_path)
    assert progress["step"] == 3 and progress["total"] == 20
    assert progress["losses"] == [(1, 0.5), (2, 0.25), (3, 0.125)]
    # a step's usual time is the median of the steps' own times, not tqdm's smoothed rate
    assert progress["steps_per_second"] == pytest.approx(2) and progress["eta_seconds"] == pytest.approx(17 * 0.5)
    assert progress["validations_left"] == 0


def test_the_time_left_counts_the_validations_still_to_come(tmp_path):
    """At step 7 of 200 (validations at 0, 100 and 200) the validations are most of what is left; at step 200 the
    final one still is."""
    output, log = tmp_path / "output", tmp_path / "train.log"
    args = Namespace(validation_prompt="a photo of sks star", validation_steps=100)
    first = output / "validation" / "step-0"  # five prompts sampled 2 s apart: a validation takes about 10 s
    first.mkdir(parents=True)
    for prompt in range(5):
        for image in range(2):
            sample = first / f"{prompt:03d}-{image}.png"
            sample.write_bytes(b"")
            os.utime(sample, (1000 + 2 * prompt, 1000 + 2 * prompt))
    log.write_text("".join(bar_line(step, 200, 0.1) for step in range(1, 8)))
    early = training_progress(log, args, output)
    assert early["validations_left"] == 2 and early["validation_seconds"] == pytest.approx(10)
    assert early["eta_seconds"] == pytest.approx(193 * 0.1 + 2 * 10)
    # the step after the validation at 100 waited 9 s for it: a better measure than the samples' times
    (output / "validation" / "step-100").mkdir()
    log.write_text("".join(bar_line(step, 200, 9.1 if step == 101 else 0.1) for step in range(1, 201)))
    last = training_progress(log, args, output)
    assert last["validations_left"] == 1 and last["validation_seconds"] == pytest.approx(9)
    assert last["eta_seconds"] == pytest.approx(9)  # not 0 s: the final validation is still to come
    (output / "validation" / "final-step-200").mkdir()
    assert training_progress(log, args, output)["eta_seconds"] == pytest.approx(0)


def test_the_time_left_says_when_no_validation_has_been_timed_yet(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("".join(bar_line(step, 100, 0.5) for step in range(1, 11)))
    progress = training_progress(log, Namespace(validation_prompt="a photo", validation_steps=50), tmp_path)
    assert progress["validations_left"] == 2 and progress["validation_seconds"] is None
    assert progress["eta_seconds"] == pytest.approx(45)  # the training's alone, and the page says so


def test_a_jobs_state_is_read_from_its_folder(tmp_path):
    store = JobStore(tmp_path)
    job_id = new_job(store)
    assert store.state(job_id)["state"] == "waiting"
    store.cancel(job_id)
    assert store.state(job_id)["state"] == "cancelled"
    store.resume(job_id)
    store._write_queue([])
    log = tmp_path / job_id / "train.log"
    for text, state in [(f"{START_MARK} x\n", "failed"), ("error: --rank must be at least 1\n", "failed"),
                        (f"{START_MARK} y\nstopped: interrupted at step 8; saved …\n", "stopped"),
                        (f"{START_MARK} z\ntrained 12 steps in 3.0 s; wrote …\n", "finished")]:
        log.write_text(log.read_text() + text if log.exists() else text)
        assert store.state(job_id)["state"] == state, text
    assert store.state(job_id)["message"].startswith("trained 12 steps")
    # a PID reused by another process is not the job's
    store._write({**store.read(job_id), "pid": 1})
    assert store.state(job_id)["state"] == "finished"
    assert json.loads((tmp_path / job_id / "job.json").read_text())["argv"][-1].endswith("output")


def test_a_deleted_job_leaves_the_list_the_queue_and_the_disk_but_a_running_one_stays(tmp_path):
    store = JobStore(tmp_path)
    waiting, finished, running = new_job(store), new_job(store), new_job(store)
    store._write_queue([waiting])
    (tmp_path / finished / "output").mkdir()
    (tmp_path / finished / "output" / "moslora.safetensors").write_bytes(b"adapter")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(tmp_path / running / "output")])
    try:
        store._write({**store.read(running), "pid": child.pid})
        with pytest.raises(UserInputError, match="cancel it"):
            store.delete(running)
        assert (tmp_path / running / "job.json").is_file()
    finally:
        child.kill()
        child.wait()
    for job_id in (waiting, finished):
        store.delete(job_id)
    assert store.ids() == [running] and store.queue() == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [running]  # nothing left behind, hidden or not


def test_a_job_cancelled_while_it_was_starting_is_cancelled_not_failed(tmp_path):
    """Ctrl-C while `train` is still importing ends it with a traceback and no result line of its own."""
    store = JobStore(tmp_path)
    job_id = new_job(store)
    store._write_queue([])
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    store._write({**store.read(job_id), "pid": dead.pid, "stopping": dead.pid})
    (tmp_path / job_id / "train.log").write_text(f"{START_MARK} now\nTraceback (most recent call last):\n"
                                                  "  File \"<frozen runpy>\", line 198\nKeyboardInterrupt\n")
    assert store.state(job_id) == {"state": "cancelled", "message": "cancelled while it was starting: nothing was "
                                                                    "trained"}
    store._write({**store.read(job_id), "stopping": None})  # not cancelled: the same end is a failure
    assert store.state(job_id)["state"] == "failed"


def test_cancel_sends_one_sigint_to_the_running_process_and_the_job_stops(tmp_path):
    store = JobStore(tmp_path)
    job_id = new_job(store)
    store._write_queue([])
    folder = tmp_path / job_id
    stand_in = ("import signal, sys, time\n"  # as train answers Ctrl-C: a moment to save, a line, exit 130
                "signals = []\nsignal.signal(signal.SIGINT, lambda *_: signals.append(1))\n"
                "print('ready', flush=True)\nwhile not signals:\n    time.sleep(0.02)\ntime.sleep(1)\n"
                "print(f'stopped: interrupted after {len(signals)} SIGINT', flush=True)\nsys.exit(130)\n")
    with open(folder / "train.log", "w") as log:
        log.write(f"{START_MARK} now\n")
        log.flush()
        child = subprocess.Popen([sys.executable, "-c", stand_in, str(folder / "output")], stdout=log)
    store._write({**store.read(job_id), "pid": child.pid})
    deadline = time.monotonic() + 30
    while "ready" not in (folder / "train.log").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert store.state(job_id)["state"] == "running"
    store.cancel(job_id)
    assert store.state(job_id)["message"].startswith("stopping")
    with pytest.raises(UserInputError, match="already stopping"):
        store.cancel(job_id)  # a second Ctrl-C would abort the checkpoint
    assert child.wait(timeout=30) == 130
    assert store.state(job_id) == {"state": "stopped", "message": "stopped: interrupted after 1 SIGINT"}


@pytest.mark.parametrize("without_proc", [False, True], ids=["proc", "ps"])
def test_a_process_is_ours_while_it_lives_with_our_folder_in_its_command_line(tmp_path, monkeypatch, without_proc):
    from pathlib import Path

    from dreambooth_moslora.ui import jobs

    if without_proc:  # as on macOS
        real_is_dir = Path.is_dir
        monkeypatch.setattr(Path, "is_dir", lambda self: False if str(self) == "/proc/self" else real_is_dir(self))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", str(tmp_path / "output")])
    try:
        assert jobs.process_alive(child.pid, str(tmp_path / "output"))
        assert not jobs.process_alive(child.pid, str(tmp_path / "other"))  # a reused PID
    finally:
        child.kill()
        child.wait()
    assert not jobs.process_alive(child.pid, str(tmp_path / "output"))
    zombie = subprocess.Popen([sys.executable, "-c", "", str(tmp_path / "output")])
    deadline = time.monotonic() + 30
    while jobs.process_alive(zombie.pid, str(tmp_path / "output")):  # ended, not yet reaped: not alive
        assert time.monotonic() < deadline
        time.sleep(0.05)
    zombie.wait()


def test_the_queue_skips_a_deleted_job_and_a_job_that_cannot_start_fails_with_its_reason(tmp_path):
    import shutil

    store = JobStore(tmp_path / "jobs")
    gone, job_id = new_job(store), new_job(store)
    shutil.rmtree(tmp_path / "jobs" / gone)  # deleted by hand while it waited
    store._write({**store.read(job_id), "cwd": str(tmp_path / "removed")})  # its working folder is gone
    store.advance()  # neither raises (which would end the UI's scheduler thread)
    assert store.queue() == []
    state = store.state(job_id)
    assert state["state"] == "failed" and state["message"].startswith("error: the training could not start")


def test_a_jobs_state_reads_only_the_end_of_a_long_log_and_the_queue_reads_no_log(tmp_path, monkeypatch):
    import tracemalloc

    store = JobStore(tmp_path / "jobs")
    job_id = new_job(store)
    store._write_queue([])
    log = tmp_path / "jobs" / job_id / "train.log"
    with open(log, "wb") as file:  # a long run's log: 64 MiB of progress bars (sparse, so no disk is used)
        file.write(f"{START_MARK} x\nerror: an earlier attempt\n{START_MARK} y\n".encode())
        file.truncate(64 * 2**20)
        file.seek(0, 2)
        file.write("\ntrained 12 steps in 3.0 s; wrote …\n".encode())
    tracemalloc.start()
    try:
        state = store.state(job_id)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert state["state"] == "finished" and state["message"].startswith("trained 12 steps")
    assert peak < 8 * 2**20
    monkeypatch.setattr(JobStore, "state", lambda *_: pytest.fail("the scheduler's tick read a job's log"))
    assert store.running() is None


def test_two_generations_at_once_get_two_numbers_and_one_that_cannot_start_fails(tmp_path, monkeypatch):
    from pathlib import Path

    from dreambooth_moslora.ui import outputs

    job = tmp_path / "job"
    (job / "output").mkdir(parents=True)
    (job / "output" / "moslora.safetensors").write_bytes(b"")
    record = {"argv": ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "p"], "cwd": str(tmp_path / "gone")}
    (job / "generated" / "1").mkdir(parents=True)  # made by a request at the same moment, after this one looked
    real_glob = Path.glob
    monkeypatch.setattr(Path, "glob", lambda self, pattern: iter(()) if self.name == "generated"
                        else real_glob(self, pattern))
    assert outputs.start_generation(job, record, "final", ["a photo"], 0, 1, 5.0, 8) == "2"
    monkeypatch.undo()
    [second] = [g for g in outputs.generations(job) if g["number"] == "2"]  # its working folder is gone
    assert second["state"] == "failed" and second["message"].startswith("error: generate could not start")


def test_every_measure_is_explained_subject_fidelity_first():
    from dreambooth_moslora.ui.progress import measures

    explained = measures([{"step": 0, "class_similarity": 0.5, "subject": 0.7, "dog/subject": 0.6, "odd": 1.0}])
    assert list(explained) == ["subject", "class_similarity", "odd", "dog/subject"]
    assert explained["subject"].startswith("likeness of the samples to your photos")
    assert "forgotten" in explained["class_similarity"] and explained["odd"] == ""
    assert explained["dog/subject"].endswith("(dog alone)")
