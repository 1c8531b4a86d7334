"""Ctrl-C during training: finish the step, stop every process at the same step, save a checkpoint.

A signal reaches each process on its own: a terminal's Ctrl-C goes to the trainer and its DataLoader workers (one
process group); torchrun and `accelerate launch` start each rank in a session of its own and pass SIGINT on to every
rank, which may see it at different steps. So the stop is agreed at each optimizer step (a one-element all-reduce)
and the DataLoader workers ignore SIGINT: the main process shuts them down when it leaves the loop.
"""

from __future__ import annotations

import signal
import sys

from .agreement import raised_anywhere


class StopOnInterrupt:
    """Ctrl-C finishes the current step and saves a checkpoint; a second Ctrl-C stops at once.

    `interrupted` is this process's own flag; `requested` is the stop every process agreed on in `should_stop`, so
    code that reads it calls the same collectives on every rank.
    """

    interrupted = False
    requested = False
    stop_early = False
    """This process's wish to end the run normally at this step (measured validation's early stopping)."""
    stopped_early = False

    def __enter__(self):
        self.previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._interrupt)
        return self

    def _interrupt(self, signum, frame):
        self.interrupted = True
        signal.signal(signal.SIGINT, self.previous)
        print("\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)
        return False

    def should_stop(self, accelerator) -> bool:
        """Whether any process was interrupted or wants to stop early; a collective, so every process must call it
        at the same step. An interrupt wins over an early stop."""
        interrupted, stop_early = raised_anywhere(accelerator, [self.interrupted, self.stop_early])
        self.requested = interrupted
        self.stopped_early = stop_early and not interrupted
        return self.requested or self.stopped_early


def ignore_interrupts(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`: a worker that dies on Ctrl-C crashes the trainer instead of letting it save."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
