"""The stage steps: each variant computes exactly its loss terms; results don't depend on
the mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd3_jax import sharding
from sd3_jax import steps
from sd3_jax import train
from sd3_jax import train_state
from sd3_jax.data import pipeline
from sd3_jax.models import sd3 as sd3_lib

COMMON = {"loss", "image", "text", "length", "image_ce", "text_ce"}
EXPECTED = {
    "singleton": COMMON,
    "singleton_3d": COMMON | {"i23d", "t23d"},
    "vanilla_dual": COMMON | {"dual_gap"},
    "sd3": COMMON | {"i23d", "t23d", "kl", "teacher", "dual_gap"},
}


def _setup(tiny_config, variant="sd3"):
  config, info = tiny_config
  config = config.copy_and_resolve_references()
  config.variant = variant
  model = sd3_lib.SD3(config, info["text"]["vocab_size"], info["graph_vocab_size"])
  batch = next(iter(pipeline.make_dataset(config, "train", seed=0)))
  return config, model, batch


def _weighted_sum(config, m):
  w = config.loss
  total = w.image * m.get("image_weighted", m["image"]) + w.text * m["text"]
  total += w.length * m["length"]
  total += w.graph * (m.get("i23d", 0) + m.get("t23d", 0))
  total += w.kl * m.get("kl", 0) + w.teacher * m.get("teacher", 0)
  return total + w.dual * m.get("dual_gap", 0)


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_each_variant_computes_exactly_its_terms(tiny_config, variant):
  config, model, batch = _setup(tiny_config, variant)
  params, model_state = jax.eval_shape(model.init, jax.random.key(0), batch)
  _, (_, metrics) = jax.eval_shape(
      lambda p, m, b: steps.loss_4(model, config, p, m, b, jax.random.key(1)),
      params, model_state, batch)
  weighted = {"image_weighted"} if config.diffusion.image_object_weight != 1 else set()
  assert set(metrics) == EXPECTED[variant] | weighted


def test_dual_loss_is_the_weighted_sum_of_its_terms(tiny_config):
  config, model, batch = _setup(tiny_config, "sd3")
  params, model_state = jax.jit(lambda r, b: jax.tree.map(
      lambda x: x, __import__("flax").linen.meta.unbox(model.init(r, b))))(
          jax.random.key(0), batch)
  loss, (_, metrics) = jax.jit(
      lambda p, m, b: steps.loss_4(model, config, p, m, b, jax.random.key(1)))(
          params, model_state, batch)
  metrics = jax.device_get(metrics)
  np.testing.assert_allclose(loss, _weighted_sum(config, metrics), rtol=1e-5)
  assert all(np.isfinite(v) for v in metrics.values())


def test_image_object_weight_changes_the_loss_not_the_logged_likelihood(tiny_config):
  """Up-weighted object tokens move the image term of the loss; the logged image VLB (and
  L_dual, which reads it) stays the plain likelihood."""
  config, model, batch = _setup(tiny_config, "singleton")
  params, model_state = jax.jit(lambda r, b: __import__("flax").linen.meta.unbox(
      model.init(r, b)))(jax.random.key(0), batch)

  def loss_at(weight):
    cfg = config.copy_and_resolve_references()
    cfg.diffusion.image_object_weight = weight
    loss, (_, m) = jax.jit(lambda p, s, b: steps.loss_4(model, cfg, p, s, b,
                                                        jax.random.key(1)))(
        params, model_state, batch)
    return float(loss), jax.device_get(m)

  (plain, m1), (weighted, m5) = loss_at(1.0), loss_at(5.0)
  assert m1["image"] == m5["image"] and "image_weighted" not in m1
  np.testing.assert_allclose(plain, _weighted_sum(config, m1), rtol=1e-5)
  np.testing.assert_allclose(weighted, _weighted_sum(config, m5), rtol=1e-5)
  assert abs(weighted - plain) > 1e-3


def test_teacher_stride_feeds_the_teachers_every_kth_example_only(tiny_config):
  """Rows 1, 3, ... get a NaN image: with stride 2 the teacher loss and the KL, computed on
  rows 0, 2, ..., stay finite (nothing mixes rows); with stride 1 they are NaN."""
  config, model, batch = _setup(tiny_config, "sd3")
  params, model_state = jax.jit(lambda r, b: __import__("flax").linen.meta.unbox(
      model.init(r, b)))(jax.random.key(0), batch)
  batch = dict(batch, image=jnp.asarray(batch["image"]).at[1::2].set(jnp.nan))

  def metrics_at(stride):
    cfg = config.copy_and_resolve_references()
    cfg.loss.teacher_stride = stride
    _, (_, m) = jax.jit(lambda p, s, b: steps.loss_4(model, cfg, p, s, b, jax.random.key(1)))(
        params, model_state, batch)
    return jax.device_get(m)

  strided, full = metrics_at(2), metrics_at(1)
  assert np.isfinite(strided["teacher"]) and np.isfinite(strided["kl"])
  assert np.isnan(full["teacher"]) and np.isnan(full["kl"])
  assert np.isnan(strided["i23d"])  # the students still see every row


def test_stages_follow_the_variant(tiny_config):
  config, _ = tiny_config
  config = config.copy_and_resolve_references()
  assert steps.stages_to_run(config) == ["0a", "0b", "1", "2", "3", "4"]
  config.variant = "vanilla_dual"
  assert steps.stages_to_run(config) == ["0a", "0b", "4"]
  config.stages = "3,4"
  config.variant = "sd3"
  assert steps.stages_to_run(config) == ["3", "4"]
  config.stages = "5"
  with pytest.raises(ValueError, match="unknown stage"):
    steps.stages_to_run(config)


def _two_dual_steps(config, model, host_batch, mesh, steps_per_call=1):
  batch = sharding.to_global(host_batch, mesh)
  rng = jax.random.key(0)
  params, model_state, abstract = train.init_model(model, config, mesh, batch, rng)
  tx = train_state.make_optimizer(train._stage_optim(config, "4"), steps.trainable_mask("4"))
  state, state_sharding = train.make_state(config, mesh, tx, params, model_state, abstract)
  step = train.compile_step(steps.make_train_step(model, config, "4", tx), state_sharding, mesh)
  losses = []
  for _ in range(2 // steps_per_call):
    state, metrics = step(state, sharding.to_global_steps([host_batch] * steps_per_call, mesh),
                          rng)
    losses.extend(float(x) for x in metrics["loss"])
  return losses, jax.device_get(state.params)


def test_dual_step_is_mesh_invariant(tiny_config):
  config, model, host_batch = _setup(tiny_config, "sd3")
  one = sharding.make_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)], jax.devices()[:1])
  want_losses, want_params = _two_dual_steps(config, model, host_batch, one)
  # (4, 1, 2) also runs both steps in one compiled call: the `substeps` scan.
  for shape, steps_per_call in (((8, 1, 1), 1), ((2, 2, 2), 1), ((4, 1, 2), 2)):
    mesh = sharding.make_mesh(list(zip(sharding.MESH_AXES, shape)))
    losses, params = _two_dual_steps(config, model, host_batch, mesh, steps_per_call)
    np.testing.assert_allclose(losses, want_losses, rtol=2e-4, err_msg=str(shape))
    # Adam divides by sqrt(v) + 1e-8, so float32 reduction-order noise in gradients that are
    # structurally ~0 becomes updates of up to ~lr, with a random sign. Such elements are
    # rare; everything else must agree tightly, and nothing may differ by more than 2 lr.
    lr = config.stage4.lr
    got = np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])
    want = np.concatenate([np.ravel(x) for x in jax.tree.leaves(want_params)])
    assert np.mean(~np.isclose(got, want, rtol=1e-3, atol=1e-5)) < 1e-3, shape
    np.testing.assert_array_less(np.abs(got - want), 2 * lr + 1e-6, err_msg=str(shape))


def test_batched_graph_chains_equal_separate_calls(tiny_config):
  """The dual step runs the graph denoiser's students (and its teachers, whose token
  counts differ) as one interleaved batch; each row must equal its own call."""
  config, model, batch = _setup(tiny_config, "sd3")
  params, _ = jax.jit(lambda r, b: __import__("flax").linen.meta.unbox(model.init(r, b)))(
      jax.random.key(0), batch)
  gd = model.graph_den
  b, n = batch["g3d_node_tag"].shape
  keys = jax.random.split(jax.random.key(3), 8)
  ids = lambda k: jax.random.randint(k, (b, n), 0, gd.num_codes + 2)  # noqa: E731
  z_v, z_y = ids(keys[0]), ids(jax.random.fold_in(keys[0], 1))
  vsg, tsg = ids(keys[1]), ids(keys[2])
  t = jax.random.randint(keys[3], (b,), 1, config.diffusion.num_steps + 1)
  drop = jax.random.bernoulli(keys[4], 0.3, (b,))
  c_i, c_y = (jax.random.normal(k, (b, model.config.model.clip.embed_dim)) for k in keys[5:7])
  dim = gd.teacher_dim
  short, long = jax.random.normal(keys[7], (b, 3, dim)), jax.random.normal(keys[7], (b, 7, dim))
  short_mask = np.ones((b, 3), bool)
  long_mask = np.arange(7)[None] < np.arange(b)[:, None] % 7 + 1
  # Each condition has its own z_t (its target on its own slots).
  for conds in ([(z_v, vsg, c_i), (z_y, tsg, c_y)],
                [(z_v, vsg, c_i, short, short_mask), (z_y, tsg, c_y, long, long_mask)]):
    batched = steps._graph_chains(model, params, t, drop, conds)
    for got, cond in zip(batched, conds):
      want, _ = gd.apply({"params": params["graph_den"]}, cond[0], t, cond[1],
                         cond[1] < gd.num_codes, *cond[2:], drop_cond=drop)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_accumulated_grads_equal_one_batch_of_k_times_the_size():
  """k micro-batches, one update: the gradient and metrics of the whole batch (a mean
  loss), in float32 whatever the parameters' dtype."""
  x = jax.random.normal(jax.random.key(0), (12, 5))
  y = jax.random.normal(jax.random.key(1), (12, 3))
  params = {"w": jax.random.normal(jax.random.key(2), (5, 3)), "b": jnp.zeros(3)}

  def loss_fn(p, model_state, batch, rng):
    del rng
    err = batch["x"] @ p["w"] + p["b"] - batch["y"]
    loss = jnp.mean(err ** 2)
    return loss, ({"count": model_state["count"] + 1}, {"loss": loss})

  whole, state1, m1 = steps.accumulated_grads(loss_fn, params, {"count": 0},
                                              {"x": x, "y": y}, jax.random.key(3), 1)
  for k in (2, 3, 4):
    acc, state_k, mk = jax.jit(lambda p, b: steps.accumulated_grads(
        loss_fn, p, {"count": 0}, b, jax.random.key(3), k))(params, {"x": x, "y": y})
    for name in params:
      np.testing.assert_allclose(acc[name], whole[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mk["loss"], m1["loss"], rtol=1e-5)
    assert int(state_k["count"]) == k and int(state1["count"]) == 1
  with pytest.raises(ValueError, match="grad_accum_steps=5"):
    steps.accumulated_grads(loss_fn, params, {"count": 0}, {"x": x, "y": y},
                            jax.random.key(3), 5)
