"""Fault injection for the resume and non-finite tests, in one place.

``DISTILLM2_CRASH=<stage>:<n>`` kills the process with SIGKILL after ``n`` batches (generation,
stage names such as ``round-2/student``) or ``n`` optimiser steps (training, ``round-2/train``)
of the named stage; with ``DISTILLM2_CRASH_SIGNAL=INT`` it sends itself SIGINT instead (a
Ctrl-C at that point). Unset, it costs one dictionary lookup per batch.
"""

from __future__ import annotations

import os
import signal


def nan_at(stage: str, step: int, variable: str = "DISTILLM2_NAN") -> bool:
    """Whether ``DISTILLM2_NAN=<stage>:<step>[,<step>...]`` asks for a non-finite loss at ``step``
    (1-based optimiser step) of ``stage`` (e.g. ``round-1/train``); ``variable``
    ``DISTILLM2_BLOWUP``: student logits scaled by 1e3 there (a finite loss explosion)."""
    spec = os.environ.get(variable)
    if not spec:
        return False
    name, _, steps = spec.rpartition(":")
    return name == stage and str(step) in steps.split(",")


def maybe_crash(stage: str, done: int) -> None:
    """Die the hard way if ``DISTILLM2_CRASH`` names ``stage`` and ``done`` reached its count."""
    spec = os.environ.get("DISTILLM2_CRASH")
    if not spec:
        return
    name, _, count = spec.rpartition(":")
    if name == stage and done >= int(count):
        os.kill(os.getpid(), signal.SIGINT if os.environ.get("DISTILLM2_CRASH_SIGNAL") == "INT" else signal.SIGKILL)
