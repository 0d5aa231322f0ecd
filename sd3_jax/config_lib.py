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
  """Loads `get_config(arg)` from an experiment file by path (for tests and tools).

  `path` may carry the argument as `--config` does: `experiments/ablation.py:variant=sd3`.
  """
  if arg is None and ":" in str(path):
    path, arg = str(path).split(":", 1)
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"experiment file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"sd3_experiment_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


class ConfigError(ValueError):
  """A config value a run cannot use; the message names the key (`main` prints it alone)."""


def _at(config, key: str):
  node = config
  for part in key.split("."):
    if part not in node:
      return _MISSING
    node = node[part]
  return node


_MISSING = object()


def _number(config, key, *, low=None, high=None, low_open=False, high_open=False,
            integer=False, errors):
  value = _at(config, key)
  if value is _MISSING or value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (
      integer and not isinstance(value, int)):
    errors.append(f"{key}={value!r} must be {'an integer' if integer else 'a number'}")
    return
  too_low = low is not None and (value <= low if low_open else value < low)
  too_high = high is not None and (value >= high if high_open else value > high)
  if too_low or too_high:
    lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
    errors.append(f"{key}={value!r} must be {' and '.join(filter(None, (lo, hi)))}")


def _choice(config, key, choices, errors):
  value = _at(config, key)
  if value is not _MISSING and value not in choices:
    errors.append(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")


def validate(config) -> None:
  """Checks every number and name of an experiment config before anything runs.

  Raises `ConfigError` listing each bad key. JAX-side choices (diffusion kinds, samplers,
  variants) are imported here, not at module import, so experiment files stay JAX-free.
  """
  from sd3_jax import steps
  from sd3_jax.diffusion import schedules

  errors: list[str] = []
  num = lambda key, **kw: _number(config, key, errors=errors, **kw)  # noqa: E731
  pick = lambda key, choices: _choice(config, key, choices, errors)  # noqa: E731
  pick("mode", ("train", "eval", "sample"))
  pick("variant", steps.VARIANTS)
  num("seed", low=0, integer=True)
  if _at(config, "variant") in steps.VARIANTS:
    try:
      steps.stages_to_run(config)
    except ValueError as e:
      errors.append(str(e))
  pick("data.name", ("spatial_scenes", "vsd_v1", "vsd_v2"))
  for key in ("data.num_train", "data.num_val", "data.num_test", "data.batch_size",
              "data.image_size", "data.max_text_len", "data.text_vocab_size",
              "data.max_nodes", "data.max_edges", "data.check_batches"):
    num(key, low=1, integer=True)
  num("data.num_workers", low=0, integer=True)
  num("data.scene_seed", low=0, integer=True)
  num("data.min_objects", low=2, high=7, integer=True)
  num("data.max_objects", low=2, high=7, integer=True)
  lo, hi = _at(config, "data.min_objects"), _at(config, "data.max_objects")
  if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
    errors.append(f"data.min_objects={lo} must be <= data.max_objects={hi}")
  pick("data.caption_style", ("v1", "v2", "both"))
  pick("data.graph_overflow", ("error", "truncate"))
  pick("data.graph_layout", ("sequential", "palette", "anchored"))
  layout = _at(config, "data.graph_layout")
  cells = _at(config, "data.layout_cells") is True
  if cells and layout != "anchored":
    errors.append(f"data.layout_cells gives each object a layout-cell slot on the anchored "
                  f"grid; data.graph_layout={layout!r} needs it False")
  if layout in ("palette", "anchored"):
    from sd3_jax.data import scenes  # numpy only
    max_objects = _at(config, "data.max_objects")
    slots = scenes.PALETTE_SLOTS if layout == "palette" else \
        scenes.anchored_slot_count(max_objects, cells) \
        if isinstance(max_objects, int) else None
    if _at(config, "data.name") != "spatial_scenes":
      errors.append(f"data.graph_layout={layout!r} keys slots on the unique colours of "
                    f"spatial_scenes; data.name={_at(config, 'data.name')!r} needs "
                    "'sequential'")
    elif slots is not None and _at(config, "data.max_nodes") != slots:
      errors.append(f"data.max_nodes={_at(config, 'data.max_nodes')} must be {slots}, the "
                    f"slot count of data.graph_layout={layout!r}"
                    + (f" at data.max_objects={max_objects}" if layout == "anchored" else "")
                    + (" with data.layout_cells" if cells else ""))
  if _at(config, "model.image_denoiser.layout_canvas") is True and layout != "anchored":
    errors.append("model.image_denoiser.layout_canvas paints the anchored grid's objects; "
                  f"data.graph_layout={layout!r} needs it False")
  for chain in ("image_denoiser", "text_denoiser"):
    if _at(config, f"model.{chain}.graph_context") is True and layout != "anchored":
      errors.append(f"model.{chain}.graph_context reads slot roles off the anchored grid; "
                    f"data.graph_layout={layout!r} needs it False")
  pick("diffusion.kind", schedules.TRANSITION_KINDS)
  pick("diffusion.schedule", schedules.SCHEDULES)
  num("diffusion.num_steps", low=1, integer=True)
  num("diffusion.aux_weight", low=0)
  num("diffusion.image_object_weight", low=0)
  num("diffusion.vlb_weight", low=0)
  if _at(config, "diffusion.vlb_weight") == 0 == _at(config, "diffusion.aux_weight"):
    errors.append("diffusion.vlb_weight and diffusion.aux_weight are both 0: the chains "
                  "would have no loss")
  for key in ("diffusion.cond_drop_rate", "diffusion.graph_drop_rate",
              "loss.predicted_graph_rate"):
    num(key, low=0, high=1)
  pick("model.graph_interface", ("embed", "fsq"))
  pick("model.compute_dtype", ("float32", "bfloat16"))
  pick("model.graph_denoiser.attention_impl", ("segment", "dense"))
  for net in ("image_denoiser", "text_denoiser", "graph_denoiser", "text_decoder", "prior",
              "clip", "dgae"):
    num(f"model.{net}.width", low=1, integer=True)
    num(f"model.{net}.num_layers", low=1, integer=True)
    num(f"model.{net}.num_heads", low=1, integer=True)
    width, heads = _at(config, f"model.{net}.width"), _at(config, f"model.{net}.num_heads")
    if isinstance(width, int) and isinstance(heads, int) and heads > 0 and width % heads:
      errors.append(f"model.{net}.width={width} must be divisible by "
                    f"model.{net}.num_heads={heads}")
  widths = (_at(config, "model.image_denoiser.width"), _at(config, "model.text_denoiser.width"))
  if _MISSING not in widths and widths[0] != widths[1]:
    errors.append(f"model.image_denoiser.width={widths[0]} must equal "
                  f"model.text_denoiser.width={widths[1]} (both chains' hidden states feed the "
                  "graph denoiser's teacher slot)")
  num("model.vqvae.codebook_size", low=2, integer=True)
  num("model.dgae.encoder_layers", low=0, integer=True)
  num("model.dgae.decoder_layers", low=1, integer=True)
  num("model.teacher_tokens", low=1, integer=True)
  num("optim.b1", low=0, high=1, high_open=True)
  num("optim.b2", low=0, high=1, high_open=True)
  num("optim.ema_decay", low=0, high=1, high_open=True)
  num("optim.grad_clip", low=0)
  num("optim.end_lr_factor", low=0, high=1)
  num("optim.grad_accum_steps", low=1, integer=True)
  accum, batch = _at(config, "optim.grad_accum_steps"), _at(config, "data.batch_size")
  if isinstance(accum, int) and isinstance(batch, int) and accum > 0 and batch % accum:
    errors.append(f"data.batch_size={batch} must be divisible by "
                  f"optim.grad_accum_steps={accum}")
  for stage in steps.STAGES:
    num(f"stage{stage}.num_steps", low=0, integer=True)
    num(f"stage{stage}.lr", low=0, low_open=True)
    num(f"stage{stage}.warmup_steps", low=0, integer=True)
    num(f"stage{stage}.weight_decay", low=0)
    num(f"stage{stage}.substeps", low=1, integer=True)
  num("stage1.min_tag_acc", low=0, high=1)
  num("stage1.min_edge_f1", low=0, high=1)
  for key in ("image", "text", "graph", "kl", "teacher", "dual", "length"):
    num(f"loss.{key}", low=0)
  num("loss.teacher_stride", low=1, integer=True)
  stride = _at(config, "loss.teacher_stride")
  if (isinstance(stride, int) and isinstance(batch, int) and isinstance(accum, int)
      and stride > 0 and accum > 0 and (batch // accum) % stride):
    errors.append(f"data.batch_size={batch} / optim.grad_accum_steps={accum} must be "
                  f"divisible by loss.teacher_stride={stride}")
  for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
              "curve_examples"):
    num(f"train.{key}", low=1, integer=True)
  num("train.sample_every_steps", low=0, integer=True)
  num("train.eval_every_steps", low=0, integer=True)
  num("eval.num_samples", low=1, integer=True)
  num("eval.batch_size", low=1, integer=True)
  num("eval.is_splits", low=1, integer=True)
  num("eval.sampling_steps", low=1, high=_at(config, "diffusion.num_steps")
      if isinstance(_at(config, "diffusion.num_steps"), int) else None, integer=True)
  num("eval.truncation_r", low=0, high=1, low_open=True)
  num("eval.guidance_scale", low=0)
  samplers = ("ancestral", "confidence")
  for key in ("image_sampler", "text_sampler", "graph_sampler"):
    pick(f"eval.{key}", samplers)
  pick("eval.split", ("val", "test"))
  pick("eval.graph_condition", ("generated", "gold"))
  if errors:
    raise ConfigError("bad config: " + "; ".join(errors))
