"""Evaluation: the ``eval`` command over a table of tasks, the held-out evaluation of runs and
comparisons, and the metrics, judge, sandbox and speculative-decoding measurements they use."""

from distillm2.evaluation.command import evaluate
from distillm2.evaluation.held_out import evaluate_models
from distillm2.evaluation.tasks import TASKS

__all__ = ["TASKS", "evaluate", "evaluate_models"]
