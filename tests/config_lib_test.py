import pathlib

import pytest

from sd3_jax import config_lib

EXPERIMENTS = pathlib.Path(__file__).resolve().parent.parent / "experiments"


def test_parse_arg_types_and_unknown_keys():
  arg = config_lib.parse_arg("tiny,variant=singleton,steps=5", tiny=False, variant="sd3",
                             steps=1)
  assert arg.tiny is True and arg.variant == "singleton" and arg.steps == 5
  with pytest.raises(ValueError, match="unknown config argument 'tnyi'"):
    config_lib.parse_arg("tnyi", tiny=False)
  with pytest.raises(ValueError, match="needs a value"):
    config_lib.parse_arg("steps", steps=1)


@pytest.mark.parametrize("name", sorted(p.name for p in EXPERIMENTS.glob("*.py")))
def test_experiment_files_load_without_jax(name):
  config = config_lib.load_config(EXPERIMENTS / name, "tiny")
  assert config.data.batch_size > 0


@pytest.mark.parametrize("file,overrides,says", [
    ("spatial_scenes.py", dict(max_nodes=40), "data.max_nodes=40 must be 35"),
    ("spatial_scenes.py", dict(max_objects=5), "must be 51, .* at data.max_objects=5"),
    ("spatial_scenes.py", dict(graph_layout="palette"), "data.max_nodes=35 must be 92"),
    ("vsdv1.py", dict(graph_layout="palette"), "needs 'sequential'"),
    ("spatial_scenes.py", dict(graph_layout="grid"), "data.graph_layout"),
    ("spatial_scenes.py", dict(layout_cells=True), "must be 39, .* with data.layout_cells"),
    ("spatial_scenes.py", dict(layout_cells=True, graph_layout="palette", max_nodes=92),
     "data.layout_cells gives each object a layout-cell slot on the anchored grid"),
])
def test_graph_layout_is_checked(file, overrides, says):
  config = config_lib.load_config(EXPERIMENTS / file, "tiny")
  config.data.update(overrides)
  with pytest.raises(config_lib.ConfigError, match=says):
    config_lib.validate(config)


def test_layout_cells_validate_at_their_slot_count():
  config = config_lib.load_config(EXPERIMENTS / "spatial_scenes.py", "tiny")
  config.data.update(layout_cells=True, max_nodes=39)
  config_lib.validate(config)


def test_graph_context_needs_the_anchored_grid():
  config = config_lib.load_config(EXPERIMENTS / "spatial_scenes.py", "tiny")
  assert config.model.text_denoiser.graph_context
  config.data.update(graph_layout="sequential")
  with pytest.raises(config_lib.ConfigError, match="model.text_denoiser.graph_context"):
    config_lib.validate(config)
  config.model.text_denoiser.graph_context = False
  config_lib.validate(config)


def test_a_chain_loss_with_no_term_is_rejected():
  config = config_lib.load_config(EXPERIMENTS / "spatial_scenes.py", "tiny")
  config.diffusion.update(vlb_weight=0.0, aux_weight=1.0, adaptive_aux=False)
  config_lib.validate(config)  # the x0 cross-entropy alone is a loss
  config.diffusion.aux_weight = 0.0
  with pytest.raises(config_lib.ConfigError, match="diffusion.vlb_weight"):
    config_lib.validate(config)


def test_curve_steps_count_the_whole_recipe_whichever_stages_a_call_runs():
  """A run split over calls (stages 0-2, then 3,4) draws its curves where one call would."""
  from sd3_jax import train  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(EXPERIMENTS / "spatial_scenes.py", None)
  whole = {s: train._steps_before(config, s) for s in ("3", "4")}  # pylint: disable=protected-access
  config.stages = "3,4"
  assert {s: train._steps_before(config, s) for s in ("3", "4")} == whole  # pylint: disable=protected-access
  assert whole["3"] == sum(config[f"stage{s}"].num_steps for s in ("0a", "0b", "1", "2"))
  config.variant = "singleton"  # no graph stages: stage 4 follows 0a, 0b
  assert train._steps_before(config, "4") == config.stage0a.num_steps + config.stage0b.num_steps  # pylint: disable=protected-access
