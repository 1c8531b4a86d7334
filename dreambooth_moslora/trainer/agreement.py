"""Decisions every process of a run must share, made once: never computed per rank and hoped equal.

Two kinds: flags any process may raise (an interrupt, measured validation's wish to stop, which only the main
process validates), agreed by an all-reduce that every process calls at the same step; and values one process
computes (which class images are missing), broadcast from the main process. Both are collectives: every process
must reach the same call.
"""

from __future__ import annotations

import torch
from accelerate.utils import broadcast_object_list


def raised_anywhere(accelerator, flags: list[bool]) -> list[bool]:
    """Each flag as true if any process raised it."""
    if accelerator.num_processes == 1:
        return [bool(flag) for flag in flags]
    counts = accelerator.reduce(torch.tensor([float(flag) for flag in flags], device=accelerator.device),
                                reduction="sum")
    return [count > 0 for count in counts.tolist()]


def decided_on_main(accelerator, decide):
    """`decide()`'s value on the main process, given to every process (only the main process calls it)."""
    if accelerator.num_processes == 1:
        return decide()
    value = [decide() if accelerator.is_main_process else None]
    broadcast_object_list(value, from_process=0)
    return value[0]
