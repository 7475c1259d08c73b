"""Figures a test wants reported: one JSON line each in the file named by $KVPFS_FIGURES.

Format, one object per line: ``{"test": name, "figure": label, "value": number}``;
bench/safety_figures.py collects them. Without $KVPFS_FIGURES the figures are only printed
(pytest shows them with -s or for a failing test).
"""

from __future__ import annotations

import json
import os

FIGURES_ENV = "KVPFS_FIGURES"


def record_figure(test: str, figure: str, value: float) -> None:
    line = json.dumps({"test": test, "figure": figure, "value": value}, ensure_ascii=False)
    print(f"figure: {line}")
    path = os.environ.get(FIGURES_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
