"""Ctrl-C: the handler, DataLoader workers that survive it, and two processes that stop at the same step."""

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from conftest import training_argv
from dreambooth_moslora.trainer.interrupt import StopOnInterrupt, ignore_interrupts
from helpers import write_images

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

# The trainer, with SIGINT sent from inside by rank 0 after its micro-step INTERRUPT_AFTER, to INTERRUPT: "process"
# (itself alone), "group" (its process group, the DataLoader workers too, as a terminal's Ctrl-C) or "launcher"
# (torchrun, which passes it on to every rank, each in a session of its own).
INTERRUPTING_TRAINER = textwrap.dedent("""
    import os, signal, sys
    from dreambooth_moslora.trainer import train as training
    from dreambooth_moslora.trainer.arguments import parse_args
    from dreambooth_moslora.verbs.cli import run_reporting_errors

    original, losses = training.TrainingLoop.micro_step, []

    def micro_step(self, *args, **kwargs):
        losses.append(original(self, *args, **kwargs))
        if len(losses) == int(os.environ["INTERRUPT_AFTER"]) and self.accelerator.process_index == 0:
            target = os.environ["INTERRUPT"]
            if target == "group":
                os.killpg(os.getpgid(0), signal.SIGINT)
            else:
                os.kill(os.getppid() if target == "launcher" else os.getpid(), signal.SIGINT)
        return losses[-1]

    training.TrainingLoop.micro_step = micro_step
    if __name__ == "__main__":
        if os.environ.get("START_METHOD"):
            import multiprocessing
            multiprocessing.set_start_method(os.environ["START_METHOD"])
        sys.exit(run_reporting_errors(lambda argv: training.train(parse_args(argv)), sys.argv[1:]))
""")


def test_first_ctrl_c_requests_a_stop_and_the_second_goes_to_the_previous_handler():
    calls = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with StopOnInterrupt() as stop:
            assert not stop.interrupted
            signal.raise_signal(signal.SIGINT)
            assert stop.interrupted and calls == []
            signal.raise_signal(signal.SIGINT)
            assert calls == [signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is not stop._interrupt
    finally:
        signal.signal(signal.SIGINT, previous)


def test_one_process_stops_on_its_own_flag_without_a_collective():
    class OneProcess:
        num_processes = 1

        def reduce(self, *args, **kwargs):
            raise AssertionError("no collective with one process")

    with StopOnInterrupt() as stop:
        assert not stop.should_stop(OneProcess()) and not stop.requested
        signal.raise_signal(signal.SIGINT)
        assert not stop.requested  # only agreed at the step boundary
        assert stop.should_stop(OneProcess()) and stop.requested


class _InterruptsItsWorker(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        os.kill(os.getpid(), signal.SIGINT)  # in the worker: as a terminal's Ctrl-C reaches it
        return torch.tensor(index)


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals to a forked worker")
def test_dataloader_workers_ignore_ctrl_c():
    loader = DataLoader(_InterruptsItsWorker(), batch_size=None, num_workers=1, worker_init_fn=ignore_interrupts)
    assert [int(item) for item in loader] == [0, 1, 2, 3]


@pytest.fixture
def photos(tmp_path):
    write_images(tmp_path / "photos", sizes=((32, 32),) * 4)
    return tmp_path / "photos"


def _interrupted_run(command, interrupt_env, timeout):
    """Runs until it ends or the timeout; a run that hangs is terminated (torchrun passes SIGTERM to its ranks)."""
    process = subprocess.Popen(command, env={**ENV, **interrupt_env}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        stdout, stderr = process.communicate(timeout=60)
        pytest.fail(f"still running after {timeout} s (a hang):\n{stderr[-3000:]}")
    return process.returncode, stdout, stderr


def _two_processes_interrupted(photos, tmp_path, target: str, port: int):
    """Two torchrun processes on the mini model, SIGINT to `target` after step 2; each rank's (step, checkpoint)."""
    (tmp_path / "trainer.py").write_text(INTERRUPTING_TRAINER)
    out = tmp_path / "out"
    argv = training_argv(ROOT / "assets" / "mini-sdxl", photos, out, "--resolution", "32",
                         "--checkpointing_steps", "1000", steps=50)
    _, _, stderr = _interrupted_run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(tmp_path / "trainer.py"), *argv], {"INTERRUPT_AFTER": "2", "INTERRUPT": target}, timeout=90)
    stopped = re.findall(r"stopped: interrupted at step (\d+); saved (\S+);", stderr)
    assert len(stopped) == 2, stderr[-3000:]  # each rank stops and says so
    return out, stopped


@pytest.mark.skipif(sys.platform != "linux", reason="gloo over localhost")
def test_ctrl_c_on_one_of_two_processes_stops_both_at_the_same_step_with_a_checkpoint(photos, tmp_path):
    """Rank 0 alone is interrupted, after step 2; rank 1 must leave the loop at the same step (it hung in a
    collective while rank 0 waited to save)."""
    out, stopped = _two_processes_interrupted(photos, tmp_path, "process", 29541)
    assert stopped[0] == stopped[1] == ("2", str(out / "checkpoint-2"))  # the step rank 0 was interrupted in
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    assert (out / "checkpoint-2" / "moslora.safetensors").is_file()
    assert not (out / "moslora.safetensors").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo over localhost")
def test_ctrl_c_to_torchrun_stops_both_processes_at_one_step_with_a_checkpoint(photos, tmp_path):
    """A Ctrl-C at torchrun: it passes SIGINT to each rank on its own, so they may see it at different steps and
    must agree (before the fix this passed only when both happened to see it in the same step)."""
    out, stopped = _two_processes_interrupted(photos, tmp_path, "launcher", 29542)
    assert stopped[0] == stopped[1]
    step = int(stopped[0][0])
    assert step >= 2 and [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{step}"]
    assert not (out / "moslora.safetensors").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX process groups")
@pytest.mark.parametrize("start_method", ["fork", "forkserver"])  # forkserver: Python 3.14's default on Linux
def test_ctrl_c_to_the_process_group_with_dataloader_workers_saves_a_checkpoint(photos, tmp_path, start_method):
    """A terminal's Ctrl-C reaches the DataLoader workers too; the run must still finish the step and save. Ctrl-C
    comes after the first of step 2's four micro-batches, so the trainer needs three more from its worker, more than
    it prefetches. A forked worker inherited the trainer's handler (and said it would save); one started by a fork
    server had Python's, and died: "DataLoader worker exited unexpectedly"."""
    (tmp_path / "trainer.py").write_text(INTERRUPTING_TRAINER)
    out = tmp_path / "out"
    argv = training_argv(ROOT / "assets" / "mini-sdxl", photos, out, "--resolution", "32",
                         "--checkpointing_steps", "1000", "--dataloader_num_workers", "1",
                         "--gradient_accumulation_steps", "4", steps=50)
    returncode, _, stderr = _interrupted_run(
        [sys.executable, str(tmp_path / "trainer.py"), *argv],
        {"INTERRUPT_AFTER": "5", "INTERRUPT": "group", "START_METHOD": start_method}, timeout=90)
    assert returncode == 130, stderr[-3000:]
    assert stderr.count("interrupt: finishing this step") == 1  # the trainer's, not a forked worker's copy
    assert f"stopped: interrupted at step 2; saved {out / 'checkpoint-2'}" in stderr
    assert (out / "checkpoint-2" / "moslora.safetensors").is_file()
    assert "Traceback" not in stderr
