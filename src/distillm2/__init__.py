"""distillm2: distil large language models with DistiLLM-2 (Ko et al., ICML 2025).

The losses live in :mod:`distillm2.losses`; the command line is ``distillm2`` (:mod:`distillm2.cli`).
"""

__version__ = "0.1.0"
