"""CSV loggers whose files survive a killed run, and the helpers that put them back where a checkpoint left them.

Avalanche's ``CSVLogger`` writes accuracy, loss and forgetting only; DR-CPSD also publishes the per-class
real-vs-synthetic MMD (``MMDPlugin``) and the wall time of each phase (``PhaseTime/<phase>/Exp<eee>``).
``MetricsCSVLogger`` writes all of them, long format (``name,x,value``), to ``<folder>/metrics.csv``.

**Append-only logs and resuming.** A CSV log grows by one flushed row at a time, so it cannot be replaced
atomically at every row the way the other outputs are. Instead a checkpoint records each log's *position*
(:func:`log_position`: its size in bytes, its number of rows and the SHA-256 of those bytes), and a resumed run
first cuts every log back to that position (:func:`restore_log`), then appends: a row written after the checkpoint
(by the phase that was interrupted, possibly half a row) is dropped and written again by the resumed phase, so no
row is lost or repeated. :class:`ResumableCSVLogger` is Avalanche's ``CSVLogger`` that can append to such a
restored file instead of truncating it. A write error (e.g. a full disk) raises
:class:`~avalanche_drcpsd.utils.WriteError` naming the file.
"""

from __future__ import annotations

import csv
import hashlib
import os
from typing import Any, Dict, Optional, Union

import torch
from avalanche.logging import BaseLogger, CSVLogger

from .utils import WriteError, sha256_file, write_error

__all__ = ["MetricsCSVLogger", "ResumableCSVLogger", "log_position", "restore_log", "LogPositionError",
           "flush_metric_values"]

_KEPT = "rows written before are intact; a resumed run truncates the log to its last checkpoint"


class LogPositionError(RuntimeError):
    """A log on disk does not start with the bytes a checkpoint recorded (shorter, or modified): resuming would
    lose or repeat rows."""


def log_position(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """``{"bytes", "rows", "sha256"}`` of a log file as it is now (zeros for a missing file)."""
    path = os.fspath(path)
    data = b""
    if os.path.exists(path):
        with open(path, "rb") as fh:
            data = fh.read()
    return {"bytes": len(data), "rows": data.count(b"\n"), "sha256": hashlib.sha256(data).hexdigest()}


def restore_log(path: Union[str, os.PathLike], position: Dict[str, Any]) -> None:
    """Cut ``path`` back to a recorded :func:`log_position` (dropping what was appended after it); raise
    :class:`LogPositionError` when the file is shorter than recorded or its first bytes changed."""
    path = os.fspath(path)
    size = int(position["bytes"])
    have = os.path.getsize(path) if os.path.exists(path) else 0
    if have < size:
        raise LogPositionError(f"{path!r} has {have} bytes but the checkpoint recorded {size} ({position['rows']} "
                               "rows): the log was truncated or replaced since, so resuming would lose rows; "
                               "start the run again without --resume")
    if size and sha256_file(path, limit=size) != position["sha256"]:
        raise LogPositionError(f"the first {size} bytes of {path!r} differ from those the checkpoint recorded: the "
                               "log was modified since, so resuming would mix two runs; start the run again "
                               "without --resume")
    if have > size or not os.path.exists(path):
        try:
            with open(path, "ab") as fh:
                fh.truncate(size)
        except OSError as exc:
            raise write_error(path, exc, kept="the log is unchanged") from exc


def flush_metric_values(evaluator) -> int:
    """Hand the metric values published since the evaluator's last callback to its loggers now; return how many.

    Avalanche's ``EvaluationPlugin.publish_metric_value`` only queues a value; the loggers receive the queue at the
    next strategy callback. A value published after the last evaluation of a run (e.g. the FID after the final
    experience) would otherwise never be written."""
    pending = list(getattr(evaluator, "_metric_values", []))
    if pending:
        for logger in evaluator.loggers:
            logger.log_metrics(pending)
        evaluator._metric_values = []
    return len(pending)


class MetricsCSVLogger(BaseLogger):
    """``metrics.csv`` with one row per scalar metric value: ``name, x, value``.

    Each row is flushed as it is written. The file is opened for appending, so rows already on disk are kept;
    ``truncate_to`` first cuts it to that many bytes (``0``: a fresh file; a checkpoint's recorded size when a
    run resumes, see :func:`restore_log`)."""

    def __init__(self, log_folder: Union[str, os.PathLike] = "csvlogs", filename: str = "metrics.csv", *,
                 truncate_to: Optional[int] = None):
        super().__init__()
        os.makedirs(log_folder, exist_ok=True)
        self.path = os.path.join(os.fspath(log_folder), filename)
        try:
            if truncate_to is not None and os.path.exists(self.path):
                with open(self.path, "ab") as fh:
                    fh.truncate(int(truncate_to))
            new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
            self._fh = open(self.path, "a", newline="", encoding="utf-8")
            self._writer = csv.writer(self._fh)
            if new:
                self._writer.writerow(["name", "x", "value"])
                self._fh.flush()
        except WriteError:
            raise
        except OSError as exc:
            raise write_error(self.path, exc, kept=_KEPT) from exc

    def log_single_metric(self, name, value, x_plot) -> None:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                return
            value = value.item()
        if not isinstance(value, (int, float)):
            return  # images, confusion matrices, dicts: not scalar rows
        try:
            self._writer.writerow([name, x_plot, f"{float(value):.6g}"])
            self._fh.flush()
        except OSError as exc:
            raise write_error(self.path, exc, kept=_KEPT) from exc

    def close(self) -> None:
        self._fh.close()


class ResumableCSVLogger(CSVLogger):
    """Avalanche's ``CSVLogger`` (``training_results.csv``, ``eval_results.csv``, same columns and rows) that, with
    ``resume=True``, appends to the files already in ``log_folder`` (cut back first with :func:`restore_log`) instead
    of truncating them; a write error raises :class:`~avalanche_drcpsd.utils.WriteError` naming the file."""

    FILES = ("training_results.csv", "eval_results.csv")

    def __init__(self, log_folder=None, *, resume: bool = False):
        folder = log_folder if log_folder is not None else "csvlogs"
        if not resume:
            try:
                super().__init__(log_folder=folder)
            except OSError as exc:
                raise write_error(folder, exc, kept=_KEPT) from exc
            return
        # the parent's __init__ opens both files with "w" (truncating them): set the same state by hand instead
        BaseLogger.__init__(self)
        self.log_folder = folder
        os.makedirs(self.log_folder, exist_ok=True)
        self.training_exp_id = None
        self.in_train_phase = None
        self.val_acc, self.val_loss = 0, 0
        headers = {"training_results.csv": "training_exp,epoch,training_accuracy,val_accuracy,training_loss,val_loss",
                   "eval_results.csv": "eval_exp,training_exp,eval_accuracy,eval_loss,forgetting"}
        files = {}
        for name in self.FILES:
            path = os.path.join(self.log_folder, name)
            try:
                fresh = not os.path.exists(path) or os.path.getsize(path) == 0
                files[name] = open(path, "a")
                if fresh:
                    print(headers[name], file=files[name], flush=True)
            except OSError as exc:
                raise write_error(path, exc, kept=_KEPT) from exc
        self.training_file = files["training_results.csv"]
        self.eval_file = files["eval_results.csv"]

    def print_train_metrics(self, *args, **kwargs):
        try:
            super().print_train_metrics(*args, **kwargs)
        except OSError as exc:
            raise write_error(os.path.join(self.log_folder, "training_results.csv"), exc, kept=_KEPT) from exc

    def print_eval_metrics(self, *args, **kwargs):
        try:
            super().print_eval_metrics(*args, **kwargs)
        except OSError as exc:
            raise write_error(os.path.join(self.log_folder, "eval_results.csv"), exc, kept=_KEPT) from exc
