"""A logger that keeps every metric value an Avalanche evaluator publishes, one CSV row each.

Avalanche's ``CSVLogger`` writes accuracy, loss and forgetting only; DR-CPSD also publishes the per-class
real-vs-synthetic MMD (``MMDPlugin``) and the wall time of each phase (``PhaseTime/<phase>/Exp<eee>``).
``MetricsCSVLogger`` writes all of them, long format (``name,x,value``), to ``<folder>/metrics.csv``. Each row is
flushed as it is written; on resume, rows already on disk are kept (the file is opened for appending).
"""

from __future__ import annotations

import csv
import os
from typing import Union

import torch
from avalanche.logging import BaseLogger

__all__ = ["MetricsCSVLogger"]


class MetricsCSVLogger(BaseLogger):
    """``metrics.csv`` with one row per scalar metric value: ``name, x, value``."""

    def __init__(self, log_folder: Union[str, os.PathLike] = "csvlogs", filename: str = "metrics.csv"):
        super().__init__()
        os.makedirs(log_folder, exist_ok=True)
        self.path = os.path.join(os.fspath(log_folder), filename)
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        self._fh = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._fh)
        if new:
            self._writer.writerow(["name", "x", "value"])
            self._fh.flush()

    def log_single_metric(self, name, value, x_plot) -> None:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                return
            value = value.item()
        if not isinstance(value, (int, float)):
            return  # images, confusion matrices, dicts: not scalar rows
        self._writer.writerow([name, x_plot, f"{float(value):.6g}"])
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
