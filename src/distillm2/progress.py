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


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each message: tests, notebooks and tools that
    capture output replace it, and a handler bound to the first one would write into a closed
    stream."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        """The current ``sys.stderr``."""
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: int | None = None) -> None:
    """Log to stderr with a time stamp (once per process); only the main process below warnings,
    so a multi-process run prints each message once. Below debug level (no ``-v``) the libraries
    underneath are quiet: see :func:`quiet_libraries`."""
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    level = _LEVEL["level"] if level is None else level
    logger.setLevel(level if is_main_process() else max(level, logging.WARNING))
    quiet_libraries(level > logging.DEBUG)


# Libraries whose progress bars and routine warnings (a bar per model load and save, "Removed
# shared tensor ... while saving" at every checkpoint; torchao's notes on kernels it cannot load
# on this machine and torch's on its enums, at every import of transformers' torchao quantizer)
# would bury our own one bar per stage.
_LIBRARIES = ("transformers", "accelerate", "huggingface_hub", "datasets", "peft", "torchao", "torch.utils._pytree")


def quiet_libraries(quiet: bool = True) -> None:
    """Hide the progress bars and below-error log messages of transformers, accelerate, the hub
    and datasets (``quiet``), or show them again (``-v``). Environment variables cover the
    libraries not yet imported (they read them on import); the ones already imported are told."""
    env = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    for name, value in env.items():
        if quiet:
            os.environ.setdefault(name, value)
        elif os.environ.get(name) == value:
            del os.environ[name]
    for name in _LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR if quiet else logging.NOTSET)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(logging.ERROR if quiet else logging.WARNING)
        (hf_logging.disable_progress_bar if quiet else hf_logging.enable_progress_bar)()
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.utils as hub_utils

        (hub_utils.disable_progress_bars if quiet else hub_utils.enable_progress_bars)()
    if "datasets" in sys.modules:
        import datasets

        (datasets.disable_progress_bars if quiet else datasets.enable_progress_bars)()


def bars_shown() -> bool:
    """Whether third-party progress bars are shown (``-v``)."""
    return _LEVEL["level"] <= logging.DEBUG


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
