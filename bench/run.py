#!/usr/bin/env python3
"""Entry point: `.venv/bin/python bench/run.py [--sizes 10,1000,5000] [--repeat N] [--quick]`.

Runs as root. See `bench/main.py` for what is measured and `--help` for options.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The benchmark drives the emulated device of emulation/, so the checkout is on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.main import main

if __name__ == "__main__":
    sys.exit(main())
