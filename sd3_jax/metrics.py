"""Where metrics go: `metrics.jsonl` always, TensorBoard event files (no TensorFlow), the log.

`Progress` turns a stream of step metrics into the human line: stage, step, steps/s,
examples/s, ETA and the losses.
"""
import json
import logging as logging_std
import math
import pathlib
import time
from typing import Mapping, Optional

from absl import logging
import numpy as np


def say(message: str):
  """One line for the user: to the absl log and to stdout (absl hides INFO without app.run)."""
  logging.info(message)
  print(message, flush=True)


class _DropMessages(logging_std.Filter):
  def __init__(self, prefixes):
    super().__init__()
    self.prefixes = tuple(prefixes)

  def filter(self, record) -> bool:
    return not str(record.msg).startswith(self.prefixes)


def drop_library_messages(*prefixes: str) -> None:
  """Drops absl-log records starting with `prefixes`: a library's messages that tell the user
  nothing (TFDS's per-builder "custom data configuration", orbax's save-wait notes)."""
  logger = logging.get_absl_logger()
  if not any(isinstance(f, _DropMessages) and f.prefixes == prefixes for f in logger.filters):
    logger.addFilter(_DropMessages(prefixes))


def _scalar(value) -> float:
  return float(np.asarray(value))


class MetricWriter:
  """Appends `{"step", "stage", **metrics}` lines to `metrics.jsonl` and TensorBoard events."""

  def __init__(self, workdir, *, enabled: bool = True, tensorboard: bool = True):
    self._enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)
    if tensorboard:
      from tensorboardX import SummaryWriter  # TF-free event writer
      self._tb = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float], stage: Optional[str] = None):
    if not self._enabled:
      return
    row = {"step": int(step)}
    if stage is not None:
      row["stage"] = stage
    row.update({k: _scalar(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for key, value in row.items():
        if key not in ("step", "stage"):
          self._tb.add_scalar(key, value, global_step=int(step))

  def write_text(self, step: int, tag: str, text: str):
    if self._enabled and self._tb is not None:
      self._tb.add_text(tag, text, global_step=int(step))

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class Progress:
  """Rate and ETA over the steps since the last report (compile time excluded by design)."""

  def __init__(self, stage: str, total_steps: int, batch_size: int, start_step: int = 0):
    self.stage, self.total, self.batch_size = stage, total_steps, batch_size
    self._last_step, self._last_time = start_step, time.perf_counter()

  def line(self, step: int, metrics: Mapping[str, float]) -> tuple[str, dict]:
    now = time.perf_counter()
    steps = step - self._last_step
    rate = steps / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    eta = (self.total - step) / rate if rate > 0 else math.inf
    losses = " ".join(f"{k}={_scalar(v):.4g}" for k, v in sorted(metrics.items()))
    text = (f"[{self.stage}] step {step}/{self.total} | {rate:.2f} steps/s "
            f"{rate * self.batch_size:.1f} ex/s | ETA {_format_eta(eta)} | {losses}")
    return text, {"perf/steps_per_s": rate, "perf/examples_per_s": rate * self.batch_size}

  def log(self, step: int, metrics: Mapping[str, float]) -> dict:
    text, perf = self.line(step, metrics)
    say(text)
    return perf


def _format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
