"""Writes the tiny VSD fixture under tests/testdata/vsd/ (vsd_format.md §7).

Run from the repository root: `python tests/testdata/make_vsd_fixture.py`. Deterministic;
the outputs are committed, this script only documents and regenerates them.

16 images of 64x64 (8 train / 4 val / 4 test), same ids and order in VSDv1 and VSDv2,
covering all 9 predicates and the three id patterns. Each image has a red subject box and
a blue object box whose geometry agrees with the predicate.
"""
import json
import pathlib

from PIL import Image, ImageDraw

ROOT = pathlib.Path(__file__).resolve().parent / "vsd"
SIZE = 64

# (img_id, split, subject, predicate, object, s_bbox, o_bbox) with boxes [y0, y1, x0, x1].
SCENES = [
    ("1000001", "train", "cup", "to the left of", "plate", [20, 44, 4, 24], [16, 48, 36, 60]),
    ("12345678_abcdef1234.jpg", "train", "lamp", "above", "table",
     [4, 20, 20, 44], [36, 60, 16, 48]),
    ("nyu_bedroom_0001_r-1.0-1.png", "train", "pillow", "on", "bed",
     [10, 30, 22, 42], [30, 58, 8, 56]),
    ("1000002", "train", "fish", "in", "tank", [20, 36, 20, 40], [8, 56, 8, 56]),
    ("23456789_0a1b2c3d4e.jpg", "train", "dog", "under", "bench",
     [40, 60, 18, 46], [4, 24, 20, 44]),
    ("1000003", "train", "man", "in front of", "car", [16, 56, 12, 44], [8, 40, 24, 52]),
    ("nyu_kitchen_0002_r-2.5-7.png", "train", "chair", "behind", "desk",
     [10, 30, 30, 50], [12, 58, 8, 48]),
    ("1000004", "train", "bike", "next to", "tree", [24, 50, 6, 28], [22, 52, 32, 56]),
    ("1000005", "val", "horse", "to the right of", "fence", [18, 46, 40, 60], [20, 44, 4, 28]),
    ("34567890_fedcba9876.jpg", "val", "book", "on", "shelf", [12, 28, 16, 40], [28, 40, 4, 60]),
    ("1000006", "val", "boy", "in front of", "wall", [20, 60, 16, 40], [4, 44, 4, 60]),
    ("nyu_office_0003_r-3.0-2.png", "val", "clock", "above", "door",
     [2, 14, 24, 40], [24, 62, 20, 44]),
    ("1000007", "test", "cat", "under", "table", [44, 60, 24, 40], [8, 30, 8, 56]),
    ("45678901_1234abcd56.jpg", "test", "sofa", "next to", "lamp",
     [24, 56, 4, 36], [10, 56, 40, 52]),
    ("1000008", "test", "bird", "in", "cage", [24, 40, 24, 36], [6, 58, 10, 54]),
    ("nyu_bathroom_0004_r-4.0-3.png", "test", "towel", "to the left of", "sink",
     [16, 40, 2, 18], [28, 52, 26, 62]),
]

# Caption overrides, by img_id: the >=3-caption record, a caption with trailing
# whitespace, and a v2 caption whose relation differs from the annotated one.
V1_CAPTIONS = {
    "1000001": ["a cup is to the left of a plate.", "there is a cup to the left of the plate.",
                "a red cup sitting to the left of a blue plate."],
    "1000004": ["a bike is parked next to a tree.   "],
}
V2_CAPTIONS = {
    "1000006": "The boy in the red shirt is behind the tall blue wall.",
}


def _image_path(img_id: str) -> pathlib.Path:
  images = ROOT / "images"
  if img_id.isdigit():
    # The second VG folder exercises the resolver's search over VG_100K*.
    folder = "VG_100K_2" if img_id == "1000002" else "VG_100K"
    return images / "vg" / folder / f"{img_id}.jpg"
  sub = "nyu" if img_id.startswith("nyu_") else "flickr"
  return images / "spatialsense" / "images" / sub / img_id


def _draw(s_box, o_box, predicate) -> Image.Image:
  img = Image.new("RGB", (SIZE, SIZE), (235, 235, 225))
  draw = ImageDraw.Draw(img)
  boxes = [((30, 60, 220), o_box), ((220, 40, 30), s_box)]
  if predicate == "behind":  # the subject is occluded by the object
    boxes.reverse()
  for colour, (y0, y1, x0, x1) in boxes:
    draw.rectangle([x0, y0, x1, y1], fill=colour)
  return img


def _triple(s, p, o, s_box, o_box, flip: bool) -> dict:
  if flip:  # vary the key order, as the real files do
    return {"p": p, "o": o, "s": s, "o_bbox": o_box, "s_bbox": s_box}
  return {"s": s, "o": o, "p": p, "s_bbox": s_box, "o_bbox": o_box}


def main() -> None:
  splits = {split: {"v1": [], "v2": []} for split in ("train", "val", "test")}
  for i, (img_id, split, s, p, o, s_box, o_box) in enumerate(SCENES):
    path = _image_path(img_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    _draw(s_box, o_box, p).save(path, format="PNG" if img_id.endswith(".png") else "JPEG",
                                quality=90)
    first = _triple(s, p, o, s_box, o_box, flip=i % 2 == 1)
    v1_triples = [first]
    if img_id == "1000001":  # the 2-triple record: the reverse pair
      v1_triples.append(_triple(o, "to the right of", s, o_box, s_box, flip=True))
    v1_caps = V1_CAPTIONS.get(img_id, [f"a {s} is {p} a {o}.", f"there is a {s} {p} the {o}."]
                              [:1 + i % 2])
    v2_cap = V2_CAPTIONS.get(
        img_id, f"The small red {s} in this picture is {p} the large blue {o}.")
    records = {
        "v1": {"img_id": img_id, "triple_list": v1_triples, "captions": v1_caps},
        "v2": {"captions": [v2_cap], "img_id": img_id, "triple_list": [first]},
    }
    for version, record in records.items():
      splits[split][version].append(record)
  for split, versions in splits.items():
    for version, records in versions.items():
      name = f"VSDv1/{split}.json" if version == "v1" else f"VSDv2/newvsd_{split}.json"
      out = ROOT / name
      out.parent.mkdir(parents=True, exist_ok=True)
      # One record per line: compact yet diffable.
      out.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")


if __name__ == "__main__":
  main()
