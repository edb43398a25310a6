"""Progress bars (rate and ETA) and console logging shared by the long-running stages."""

from __future__ import annotations

import contextlib
import logging
import sys

logger = logging.getLogger("distillm2")


def setup_logging(level=logging.INFO) -> None:
    """Log to stderr with a time stamp (once per process)."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(level)


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
