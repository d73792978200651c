"""`python -m sparrow_kernels` = the `sparrow` command line (see cli.py)."""
import sys

from sparrow_kernels.cli import main

sys.exit(main())
