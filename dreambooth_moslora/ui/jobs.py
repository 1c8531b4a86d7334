"""The job queue: one training at a time, each its own `dreambooth-moslora train` process.

A job is a folder under the jobs folder: job.json (its arguments), photos/ (its copy of the photos and captions),
output/ (the run's --output_dir), train.log (the process's output) and generated/. Everything the UI shows is read
from there, so the UI can close or restart while a training runs; a restarted UI finds its jobs and their processes
again. queue.json holds the waiting jobs in order.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from ..adapter.errors import UserInputError
from ..adapter.files import write_text_atomically

JOB_FILE, QUEUE_FILE, LOG_FILE = "job.json", "queue.json", "train.log"
LOG_TAIL_BYTES = 2**20
"""How much of a log's end its job's state reads: a long run's progress bars fill megabytes, polled every tick."""
START_MARK = "[ui] started"
OUTCOMES = (("finished", re.compile(r"^trained \d+ steps in ", re.M)), ("stopped", re.compile(r"^stopped: ", re.M)),
            ("failed", re.compile(r"^error: ", re.M)))


class UnknownJob(KeyError):
    """No job of that id: a 404, where any other KeyError is a bug, not a missing job."""


def cli_command(verb: str, argv: list[str]) -> list[str]:
    """`dreambooth-moslora VERB …` as an argument list (never a shell), with this Python."""
    return [sys.executable, "-m", "dreambooth_moslora.verbs.cli", verb, *argv]


def option_words(name: str, value: str) -> list[str]:
    """`--name value`, or `--name=value` when the value starts with "-": argparse would take it for an option (a
    prompt "--ar 16:9 …" would fail with "expected one argument")."""
    return [f"--{name}={value}"] if value.startswith("-") else [f"--{name}", value]


def process_alive(pid: int | None, needle: str) -> bool:
    """Whether `pid` is a live process (not a zombie) whose command line holds `needle`: a reused PID is not our
    job. Read from /proc on Linux, from `ps` where there is none (macOS)."""
    if not pid:
        return False
    if Path("/proc/self").is_dir():
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return False
    else:
        state, command = _ps_state_and_command(pid)
    return bool(state) and not state.startswith("Z") and needle in command


def _last_attempt(log: Path) -> str | None:
    """The log since its last start, from its last LOG_TAIL_BYTES (all of them that attempt's when the start lies
    further back); None when it never started."""
    if not log.is_file():
        return None
    with open(log, "rb") as file:
        size = file.seek(0, os.SEEK_END)
        file.seek(max(0, size - LOG_TAIL_BYTES))
        tail = file.read().decode("utf-8", errors="replace")
    if START_MARK in tail:
        return tail.rsplit(START_MARK, 1)[1]
    return tail if size > LOG_TAIL_BYTES else None


def _ps_state_and_command(pid: int) -> tuple[str, str]:
    """-ww: the whole command line, not cut at the terminal's width (COLUMNS)."""
    shown = subprocess.run(["ps", "-ww", "-o", "stat=,command=", "-p", str(pid)], capture_output=True, text=True)
    state, _, command = shown.stdout.strip().partition(" ")
    return state, command


class JobStore:
    """The jobs of one folder. Thread-safe: the scheduler and the requests share it."""

    def __init__(self, root):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.children: dict[str, subprocess.Popen] = {}

    def folder(self, job_id: str) -> Path:
        if not re.fullmatch(r"[\w-]+", job_id or "") or not (self.root / job_id / JOB_FILE).is_file():
            raise UnknownJob(job_id)
        return self.root / job_id

    def read(self, job_id: str) -> dict:
        return json.loads((self.folder(job_id) / JOB_FILE).read_text(encoding="utf-8"))

    def _write(self, job: dict):
        write_text_atomically(self.root / job["id"] / JOB_FILE, json.dumps(job, indent=1))

    def queue(self) -> list[str]:
        path = self.root / QUEUE_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []

    def _write_queue(self, ids: list[str]):
        write_text_atomically(self.root / QUEUE_FILE, json.dumps(ids))

    def _dequeue(self, job_id: str):
        self._write_queue([i for i in self.queue() if i != job_id])

    def ids(self) -> list[str]:
        """Newest first; a job still being built (hidden) is not one yet."""
        return sorted((p.parent.name for p in self.root.glob(f"*/{JOB_FILE}") if not p.parent.name.startswith(".")),
                      reverse=True)

    def create(self, name: str, fill_photos, argv_of, check) -> str:
        """A new waiting job: fill_photos(folder) writes its photos, argv_of(photos, output) gives its `train`
        arguments, check(argv) raises when `train` would refuse them. Built in a hidden folder and renamed into
        place, so a failure leaves no half job. Relative paths keep meaning what they meant here: the job runs
        in this working folder, also when a later UI starts it."""
        job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]
        staging = self.root / f".new-{job_id}"
        try:
            staging.mkdir()
            fill_photos(staging / "photos")
            final = self.root / job_id
            check(argv_of(str(staging / "photos"), str(final / "output")))
            argv = argv_of(str(final / "photos"), str(final / "output"))
            write_text_atomically(staging / JOB_FILE, json.dumps(
                {"id": job_id, "name": name, "argv": argv, "cwd": os.getcwd(), "created": time.time(), "pid": None},
                indent=1))
            # the log exists from the start, so its link shows why nothing has run yet
            write_text_atomically(staging / LOG_FILE, f"[ui] created {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                                                      "waiting for its turn in the queue\n")
            staging.rename(final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        with self.lock:
            self._write_queue(self.queue() + [job_id])
        return job_id

    def state(self, job_id: str) -> dict:
        """{"state": waiting, running, finished, stopped, failed, cancelled or new; "message": its last line}."""
        job, folder = self.read(job_id), self.folder(job_id)
        if job_id in self.queue():
            return {"state": "waiting", "message": f"waiting, number {self.queue().index(job_id) + 1} in the queue"}
        if self._alive(job_id, job):
            if job.get("stopping") == job["pid"]:
                return {"state": "running", "message": "stopping: finishing its step and saving a checkpoint"}
            return {"state": "running", "message": "running"}
        if job.get("cancelled"):
            return {"state": "cancelled", "message": "cancelled before it started"}
        attempt = _last_attempt(folder / LOG_FILE)
        if attempt is None:
            return {"state": "new", "message": "not started"}
        for state, pattern in OUTCOMES:
            found = list(pattern.finditer(attempt))
            if found:
                return {"state": state, "message": attempt[found[-1].start():].split("\n", 1)[0].strip()}
        if job["pid"] and job.get("stopping") == job["pid"]:  # Ctrl-C while it was importing, before train answers it
            return {"state": "cancelled", "message": "cancelled while it was starting: nothing was trained"}
        return {"state": "failed", "message": "the training process ended without a result; see train.log"}

    def running(self) -> str | None:
        """Asks only whether processes live: the scheduler calls it every tick, for every job."""
        waiting = self.queue()
        return next((i for i in self.ids() if i not in waiting and self._alive(i, self.read(i))), None)

    def _alive(self, job_id: str, job: dict) -> bool:
        return process_alive(job.get("pid"), str(self.folder(job_id) / "output"))

    def start(self, job_id: str, resume: bool = False):
        """Run the job's `train` in a session of its own: closing the UI (or its terminal) does not stop it."""
        with self.lock:
            job, folder = self.read(job_id), self.folder(job_id)
            argv = job["argv"] + (["--resume_from_checkpoint", "latest"] if resume else [])
            command = cli_command("train", argv)
            with open(folder / LOG_FILE, "a", encoding="utf-8") as log:
                log.write(f"\n{START_MARK} {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                          f"dreambooth-moslora train {shlex.join(argv)}\n")
                log.flush()
                try:
                    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True, cwd=job["cwd"])
                except OSError as error:  # e.g. its working folder is gone: a failed job, not a dead scheduler
                    log.write(f"error: the training could not start: {error}\n")
                    return
            self.children[job_id] = child
            self._write({**job, "pid": child.pid, "cancelled": False})

    def cancel(self, job_id: str):
        """A waiting job leaves the queue; a running one gets SIGINT (Ctrl-C: it saves a checkpoint and stops)."""
        with self.lock:
            job = self.read(job_id)
            if job_id in self.queue():
                self._dequeue(job_id)
                self._write({**job, "cancelled": True})
            elif self._alive(job_id, job):
                if job.get("stopping") == job["pid"]:  # a second Ctrl-C would abort without the checkpoint
                    raise UserInputError(f"job {job_id} is already stopping: it saves a checkpoint first")
                os.kill(job["pid"], signal.SIGINT)
                self._write({**job, "stopping": job["pid"]})
            else:
                raise UserInputError(f"job {job_id} is neither waiting nor running")

    def resume(self, job_id: str):
        """Back into the queue; it continues from its latest checkpoint when its turn comes."""
        with self.lock:
            if self.state(job_id)["state"] in ("waiting", "running"):
                raise UserInputError(f"job {job_id} is already {self.state(job_id)['state']}")
            self._write({**self.read(job_id), "resume": True, "cancelled": False})
            self._write_queue(self.queue() + [job_id])

    def delete(self, job_id: str):
        """The job's folder goes, adapters and all (download what you keep first). A running job is refused: it
        must be cancelled and have stopped, since deleting under a live process would lose its checkpoint."""
        with self.lock:
            folder = self.folder(job_id)
            if self._alive(job_id, self.read(job_id)):
                raise UserInputError(f"job {job_id} is running: cancel it, and delete it once it has stopped")
            self._dequeue(job_id)
            trash = self.root / f".deleted-{job_id}"  # hidden at once: out of the list even if removal fails
            folder.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)

    def move(self, job_id: str, position: int):
        """Reorder the queue: the waiting job to `position` (0 = next)."""
        with self.lock:
            ids = self.queue()
            if job_id not in ids:
                raise UserInputError(f"job {job_id} is not waiting")
            ids.remove(job_id)
            ids.insert(max(0, min(position, len(ids))), job_id)
            self._write_queue(ids)

    def advance(self):
        """The scheduler's tick: reap finished children, and start the next waiting job when none runs."""
        with self.lock:
            for job_id, child in list(self.children.items()):
                if child.poll() is not None:
                    del self.children[job_id]
            ids = [i for i in self.queue() if (self.root / i / JOB_FILE).is_file()]  # a job deleted while waiting
            if not ids or self.running():
                return
            self._write_queue(ids[1:])
            self.start(ids[0], resume=self.read(ids[0]).get("resume", False))
