"""Fault injection for the resume tests, in one place.

``DISTILLM2_CRASH=<stage>:<n>`` kills the process with SIGKILL after ``n`` batches (generation,
stage names such as ``round-2/student``) or ``n`` optimiser steps (training, ``round-2/train``)
of the named stage. Unset, it costs one dictionary lookup per batch.
"""

from __future__ import annotations

import os
import signal


def maybe_crash(stage: str, done: int) -> None:
    """Die the hard way if ``DISTILLM2_CRASH`` names ``stage`` and ``done`` reached its count."""
    spec = os.environ.get("DISTILLM2_CRASH")
    if not spec:
        return
    name, _, count = spec.rpartition(":")
    if name == stage and done >= int(count):
        os.kill(os.getpid(), signal.SIGKILL)
