"""distillm2: distil large language models with DistiLLM-2 (Ko et al., ICML 2025).

The public API -- the command line (``distillm2``, :mod:`distillm2.cli`) calls these same
functions::

    from distillm2 import RunConfig, load_config, run
    cfg = load_config(RunConfig, "configs/demo.yaml", ["rounds=1", "output_dir=runs/api"])
    run_dir = run(cfg)

Each command has a config class (``RunConfig``, ``TrainStageConfig``, ``GenerateConfig``,
``EvaluateConfig``, ``CompareConfig``) and a function (``run``, ``train_stage``,
``generate``, ``evaluate``, ``compare``); the ``distillm2 train`` command calls ``train_stage``
(the name ``train`` stays the submodule :mod:`distillm2.train`, the training loop). The losses are pure functions in :mod:`distillm2.losses`.
"""

from distillm2._version import __version__
from distillm2.comparison import compare
from distillm2.config import (
    CompareConfig,
    EvaluateConfig,
    GenerateConfig,
    RunConfig,
    TrainStageConfig,
    load_config,
)
from distillm2.errors import ConfigError, DataError, MissingExtra, TokenizerMismatch, UserError
from distillm2.evaluation import evaluate
from distillm2.generation import generate
from distillm2.losses import (
    LOSSES,
    adaptive_alpha,
    beta_schedule,
    distillation_loss,
    distillm2_loss,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from distillm2.pipeline import run, train_stage

__all__ = [
    "LOSSES", "CompareConfig", "ConfigError", "DataError", "EvaluateConfig", "GenerateConfig", "MissingExtra",
    "RunConfig", "TokenizerMismatch", "TrainStageConfig", "UserError", "__version__", "adaptive_alpha",
    "beta_schedule", "compare", "distillation_loss", "distillm2_loss", "evaluate", "forward_kl", "generalized_jsd",
    "generate", "load_config", "reverse_kl", "run", "skew_forward_kl", "skew_reverse_kl", "total_variation",
    "train_stage",
]
