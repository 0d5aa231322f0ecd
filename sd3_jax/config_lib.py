"""Helpers for experiment files: typed argument parsing and config validation.

Experiment files (`experiments/*.py`) import only `ml_collections` and this module, so
loading a config never imports JAX and takes milliseconds.
"""
import importlib.util
import pathlib
from typing import Any, Optional

import ml_collections


def parse_arg(arg: Optional[str], **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `"tiny,variant=sd3"`-style config arguments against typed defaults.

  A bare word sets a bool default to True; `key=value` is converted to the default's type.
  Unknown keys raise, so a typo in `--config=experiments/x.py:tnyi` fails at once.
  """
  result = ml_collections.ConfigDict(dict(defaults))
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(
          f"unknown config argument {key!r}; known: {', '.join(sorted(defaults))}")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      result[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key!r} is a bool, got {value!r}")
      result[key] = value.lower() in ("true", "1")
    else:
      result[key] = type(default)(value)
  return result


def load_config(path: str, arg: Optional[str] = None) -> ml_collections.ConfigDict:
  """Loads `get_config(arg)` from an experiment file by path (for tests and tools)."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f"sd3_experiment_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
