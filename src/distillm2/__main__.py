"""``python -m distillm2``: the same as the ``distillm2`` command."""

import sys

from distillm2.cli import main

if __name__ == "__main__":
    sys.exit(main())
