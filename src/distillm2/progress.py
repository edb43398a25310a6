"""Progress bars (rate and ETA) and console logging shared by the long-running stages."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

logger = logging.getLogger("distillm2")
_LEVEL = {"level": logging.INFO}


def set_verbosity(verbose: int = 0, quiet: int = 0) -> None:
    """-v: debug messages; -q: warnings and errors only (the command line's flags)."""
    _LEVEL["level"] = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    setup_logging()


def is_main_process() -> bool:
    """Rank 0 of a launched job (or a single process), from the launcher's environment."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def setup_logging(level: int | None = None) -> None:
    """Log to stderr with a time stamp (once per process); only the main process below warnings,
    so a multi-process run prints each message once."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    level = _LEVEL["level"] if level is None else level
    logger.setLevel(level if is_main_process() else max(level, logging.WARNING))


@contextlib.contextmanager
def progress_bar(total: int, desc: str, unit: str = "it", disable: bool = False, initial: int = 0):
    """A tqdm bar (rate, elapsed, ETA) on stderr; a no-op object when disabled."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, disable=disable, initial=initial,
               dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()
