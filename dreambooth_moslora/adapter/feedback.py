"""What our commands print: our own progress bars and lines, not our dependencies' known-harmless noise."""

from __future__ import annotations

import logging
import os

from tqdm.auto import tqdm

HARMLESS_DEPENDENCY_MESSAGES = {
    # transformers 5 without torchvision falls back to the PIL image processors, which is all we use
    "transformers.utils.import_utils": "requires torchvision (not installed)",
}


def progress_bar(iterable=None, *, show: bool = True, **options) -> tqdm:
    """tqdm that honours TQDM_DISABLE (tqdm reads it only when `disable` is not passed, and we pass it)."""
    disabled_by_env = os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")
    return tqdm(iterable, disable=not show or disabled_by_env, **options)


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def silence_harmless_dependency_warnings():
    """Filter each known-harmless message at the logger that emits it; everything else still gets through."""
    for logger_name, fragment in HARMLESS_DEPENDENCY_MESSAGES.items():
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropMessage) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(_DropMessage(fragment))


def quiet_dependency_progress_bars():
    """The commands show their own bars; the libraries' per-file loading bars are noise around them."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
