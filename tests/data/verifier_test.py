"""Tests for the rule-based spatial verifier (images and captions)."""
import numpy as np
import pytest

from sd3_jax.data import render
from sd3_jax.data import scenes
from sd3_jax.data import schema
from sd3_jax.data import verifier


def _examples(n, size=64, offset=50_000):
  return [scenes.make_example(offset + s, image_size=size) for s in range(n)]


def _triples(ex, converse=False):
  cols = [o.colour for o in ex.scene.objects]
  return [(cols[i], scenes.CONVERSE[p] if converse else p, cols[j])
          for i, p, j in ex.described if not (converse and p == "next to")]


def test_agrees_with_gold_on_described_pairs():
  exs = _examples(100)
  images = np.stack([ex.rendered.image for ex in exs])
  hits = verifier.verify_images(images, [_triples(ex) for ex in exs])
  false_alarms = verifier.verify_images(images, [_triples(ex, True) for ex in exs])
  assert verifier.spatial_accuracy(hits) >= 0.95
  assert verifier.spatial_accuracy(false_alarms) <= 0.05


def test_segmentation_recovers_visible_pixels(monkeypatch):
  exs = _examples(20, 32)
  for ex in exs:  # component filtering only ever drops pixels
    masks = verifier.segment(ex.rendered.image)
    for i, o in enumerate(ex.scene.objects):
      if o.colour in masks:
        assert not np.any(masks[o.colour] & (ex.rendered.ids != i))
  monkeypatch.setattr(verifier, "MIN_COMPONENT", 0.0)
  for ex in exs:  # pixel classification is exact on gold renders
    masks = verifier.segment(ex.rendered.image)
    for i, o in enumerate(ex.scene.objects):
      visible = ex.rendered.ids == i
      np.testing.assert_array_equal(masks.get(o.colour, np.zeros_like(visible)), visible)


def test_estimated_positions_near_gold():
  for ex in _examples(20):
    gold = scenes.gold_geoms(ex.scene)
    est = verifier.estimate_geoms(ex.rendered.image)
    for i in np.nonzero(scenes.describable(ex.scene, ex.rendered))[0]:
      c = ex.scene.objects[i].colour
      assert abs(est[c].x - gold[c].x) < 0.3 and abs(est[c].z - gold[c].z) < 0.6
      assert est[c].support == gold[c].support


def test_blank_image_is_all_misses():
  blank = np.zeros((2, 64, 64, 3), np.uint8)
  blank[1] = render.GROUNDS["table"]
  triples = [("red cube", "to the left of", "blue sphere"), ("red", "next to", "green")]
  assert verifier.verify_images(blank, [triples, triples]) == [[False, False]] * 2


def test_missing_object_is_a_miss():
  ex = _examples(1)[0]
  (s, p, _), = _triples(ex)[:1]
  absent = next(c for c in render.PALETTE if c not in [o.colour for o in ex.scene.objects])
  assert verifier.verify_images(ex.rendered.image[None], [[(s, p, absent)]]) == [[False]]


def test_bad_input_raises():
  with pytest.raises(schema.DataError, match="images"):
    verifier.verify_images(np.zeros((2, 8, 8, 3), np.uint8), [[]])
  with pytest.raises(schema.DataError, match="square"):
    verifier.estimate_geoms(np.zeros((8, 6, 3), np.uint8))
  with pytest.raises(schema.DataError, match="golds"):
    verifier.verify_captions(["a"], [])


def test_graph_relation_set_is_the_gold_relation_set():
  for s in range(50):
    sc = scenes.generate_scene(s)
    rels, objects = verifier.gold_from_graph(scenes.scene_3dsg(sc))
    assert rels == scenes.gold_relation_set(sc)
    assert set(objects) == {o.colour for o in sc.objects}


def test_verify_captions():
  captions, golds = [], []
  for ex in _examples(30, 32):
    rec = scenes.scene_to_record(ex.scene, "x.png", rendered=ex.rendered,
                                 described=ex.described)
    captions += rec["captions"] + rec["captions_v2"]
    golds += [rec["scene_3dsg"]] * (len(rec["captions"]) + 1)
  assert verifier.spatial_accuracy(verifier.verify_captions(captions, golds)) == 1.0
  sc = scenes.generate_scene(0)
  a, b = sc.objects[0], sc.objects[1]
  rels = scenes.gold_relation_set(sc)
  p = next(p for (x, p, y) in sorted(rels)
           if (x, y) == (a.colour, b.colour) and p != "next to")
  good = f"the {a.colour} {a.shape} is {p} the {b.colour} {b.shape}."
  wrong_pred = f"the {a.colour} {a.shape} is {scenes.CONVERSE[p]} the {b.colour} {b.shape}."
  other = "sphere" if a.shape != "sphere" else "cube"
  wrong_shape = f"the {a.colour} {other} is {p} the {b.colour} {b.shape}."
  g = scenes.scene_3dsg(sc)
  out = verifier.verify_captions([good, wrong_pred, wrong_shape, "hello."], [g] * 4)
  assert out == [[True], [False], [False], [False]]
  # A relation set works as the gold too (colours only).
  assert verifier.verify_captions([good], [rels]) == [[True]]


def test_accuracy_helpers():
  hits = [[True, False], [True]]
  triples = [[("red", "on", "blue"), ("red", "behind", "blue")], [("a red", "on", "blue")]]
  assert verifier.spatial_accuracy(hits) == pytest.approx(2 / 3)
  assert verifier.spatial_accuracy([]) == 0.0
  assert verifier.per_predicate_accuracy(hits, triples) == {"behind": (0.0, 1),
                                                            "on": (1.0, 2)}


def test_stacking_survives_a_blended_contact_row():
  """A decoder blurs the row between a stacked object and its support into a mix of the two
  colours (no palette hue); the verifier must still read "on" there, and only there."""
  stacked = []
  for ex in _examples(200, offset=70_000):
    stacked += [(ex, i, j) for i, p, j in ex.described if p == "on"]
    if len(stacked) >= 5:
      break
  assert stacked, "no stacked pair among the examples"
  for ex, i, j in stacked:
    cols = [o.colour for o in ex.scene.objects]
    image = ex.rendered.image.copy()
    top = ex.rendered.ids == i
    y1 = np.nonzero(top.any(1))[0].max()
    xs = np.nonzero(top[y1])[0]
    below = image[y1 + 1, xs].astype(np.float32)
    image[y1 + 1, xs] = np.round(0.5 * below + 0.5 * image[y1, xs]).astype(np.uint8)
    assert verifier.verify_images(image[None], [[(cols[i], "on", cols[j])]]) == [[True]]
    assert verifier.verify_images(image[None], [[(cols[j], "on", cols[i])]]) == [[False]]


def _rgb(name):
  return np.round(255 * np.array(render.PALETTE[name])).astype(np.uint8)


def _two_boxes(below_rows, below_cols, gap_rows=0, gap_colour=None):
  """A 64x64 floor with a small blue box (rows 20-27, cols 24-31) and a red box below it,
  `gap_rows` rows lower, the gap filled with `gap_colour` (None: the floor shows)."""
  image = np.broadcast_to(np.array(render.GROUNDS["floor"], np.uint8), (64, 64, 3)).copy()
  image[20:28, 24:32] = _rgb("blue")
  if gap_rows:
    image[28:28 + gap_rows, 24:32] = render.GROUNDS["floor"] if gap_colour is None else gap_colour
  image[below_rows[0] + gap_rows:below_rows[1], below_cols[0]:below_cols[1]] = _rgb("red")
  return verifier.estimate_geoms(image)


def test_stacking_needs_a_plausible_support_in_contact():
  large = ((28, 50), (18, 38))  # wider than the blue box, and reaching far below it
  assert _two_boxes(*large)["blue"].support == "red"
  # A decoder moves the contact by a pixel or two: blended rows are looked through...
  mix = np.round(0.5 * _rgb("blue") + 0.5 * _rgb("red")).astype(np.uint8)
  for gap in (1, 2):
    assert _two_boxes(*large, gap_rows=gap, gap_colour=mix)["blue"].support == "red"
  # ...and so is a thin fringe of a third palette colour (not a support itself)...
  assert _two_boxes(*large, gap_rows=1, gap_colour=_rgb("orange"))["blue"].support == "red"
  # ...but ground seen in between means no contact.
  assert _two_boxes(*large, gap_rows=1)["blue"].support is None
  # A ground object just behind a narrower or shorter one is not stacked on it.
  assert _two_boxes((28, 50), (25, 31))["blue"].support is None  # narrower
  assert _two_boxes((28, 32), (18, 38))["blue"].support is None  # ends just below


def test_stacking_survives_a_fringe_and_a_two_row_blend():
  """On gold stacked pairs: a decoder's fringe (a palette colour absent from the scene) in
  the contact row, or two blended rows, still read "on"; the converse never does."""
  stacked = []
  for ex in _examples(200, offset=70_000):
    stacked += [(ex, i, j) for i, p, j in ex.described if p == "on"]
    if len(stacked) >= 5:
      break
  for ex, i, j in stacked:
    cols = [o.colour for o in ex.scene.objects]
    fringe = _rgb(next(c for c in render.PALETTE if c not in cols))
    top = ex.rendered.ids == i
    y1 = np.nonzero(top.any(1))[0].max()
    xs = np.nonzero(top[y1])[0]
    blended = ex.rendered.image.copy()
    mix = 0.5 * blended[y1, xs].astype(np.float32) + 0.5 * blended[y1 + 3, xs]
    blended[y1 + 1:y1 + 3, xs] = np.round(mix).astype(np.uint8)
    fringed = ex.rendered.image.copy()
    fringed[y1 + 1, xs] = fringe
    for image in (blended, fringed):
      assert verifier.verify_images(image[None], [[(cols[i], "on", cols[j])]]) == [[True]]
      assert verifier.verify_images(image[None], [[(cols[j], "on", cols[i])]]) == [[False]]
