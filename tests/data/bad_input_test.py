"""Bad VSD input: every problem is a DataError naming file, record and field; the tolerant
mode skips, counts and reports each one."""
import json
import re
import shutil

import pytest

from sd3_jax.data import vsd
from sd3_jax.data.schema import DataError

BAD_INDEX = 2


@pytest.fixture
def good_records(testdata):
  return json.loads((testdata / "vsd" / "VSDv1" / "train.json").read_text())


@pytest.fixture
def image_roots(testdata, tmp_path):
  """A writable copy of the fixture images."""
  images = tmp_path / "images"
  shutil.copytree(testdata / "vsd" / "images", images)
  return {"vg_root": images / "vg", "spatialsense_root": images / "spatialsense"}


def _write(tmp_path, records, name="bad.json"):
  path = tmp_path / name
  path.write_text(json.dumps(records, indent=1))
  return path


def _assert_located(error, path, field):
  message = str(error)
  assert str(path) in message and error.file == str(path)
  assert f"record {BAD_INDEX}" in message and error.record == BAD_INDEX
  assert repr(field) in message and error.field == field


def _check_record_case(tmp_path, records, field, message_part, reason):
  """Strict load raises a located error; tolerant load skips exactly that record."""
  path = _write(tmp_path, records)
  with pytest.raises(DataError) as info:
    vsd.load_records(path)
  _assert_located(info.value, path, field)
  assert message_part in str(info.value)
  report = vsd.LoadReport()
  kept = vsd.load_records(path, skip_bad=True, report=report)
  assert len(kept) == len(records) - 1
  assert BAD_INDEX not in [r.index for r in kept]
  assert report.total == len(records) and report.loaded == len(records) - 1
  assert report.skipped == {reason: 1} and report.num_skipped == 1
  assert report.messages == [str(info.value)]
  assert f"skipped 1 ({reason}: 1)" in report.summary()


def test_malformed_json(tmp_path, good_records):
  text = "[\n" + ",\n".join(json.dumps(r) for r in good_records) + "\n]\n"
  lines = text.split("\n")
  lines[1 + BAD_INDEX] = lines[1 + BAD_INDEX].replace('"captions":', '"captions"', 1)
  path = tmp_path / "broken.json"
  path.write_text("\n".join(lines))
  for skip_bad in (False, True):  # records after a syntax error can't be trusted
    with pytest.raises(DataError) as info:
      vsd.load_records(path, skip_bad=skip_bad)
    message = str(info.value)
    assert str(path) in message and f"record {BAD_INDEX}" in message
    assert re.search(rf"line {2 + BAD_INDEX} column \d+", message)
    assert info.value.record == BAD_INDEX


@pytest.mark.parametrize("text,expected", [
    ("", "expected a JSON array"),
    ('{"img_id": "1"}', "expected a JSON array"),
    ("[{}] x", "extra data"),
    ('[{"a": 1} {"b": 2}]', "expected ',' or ']'"),
    ("[", "malformed JSON"),
])
def test_malformed_top_level(tmp_path, text, expected):
  path = tmp_path / "top.json"
  path.write_text(text)
  with pytest.raises(DataError, match=re.escape(expected)) as info:
    vsd.load_records(path)
  assert str(path) in str(info.value)


def test_unreadable_file(tmp_path):
  with pytest.raises(DataError, match="cannot read"):
    vsd.load_records(tmp_path / "missing.json")


def test_empty_array_is_fine(tmp_path):
  assert vsd.load_records(_write(tmp_path, [])) == []


@pytest.mark.parametrize("field", ["captions", "img_id", "triple_list",
                                   "triple_list[0].o", "triple_list[0].o_bbox",
                                   "triple_list[0].p"])
def test_missing_field(tmp_path, good_records, field):
  path, key = field.rsplit(".", 1) if "." in field else (None, field)
  target = good_records[BAD_INDEX]["triple_list"][0] if path else good_records[BAD_INDEX]
  del target[key]
  _check_record_case(tmp_path, good_records, field, "", re.sub(r"\[\d+\]", "[]", field))


def test_unknown_predicate(tmp_path, good_records):
  good_records[BAD_INDEX]["triple_list"][0]["p"] = "on the left of"
  _check_record_case(tmp_path, good_records, "triple_list[0].p", "unknown predicate",
                     "triple_list[].p")


def test_unknown_predicate_in_second_triple(tmp_path, good_records):
  good_records[BAD_INDEX]["triple_list"].append(
      dict(good_records[BAD_INDEX]["triple_list"][0], p="besides"))
  _check_record_case(tmp_path, good_records, "triple_list[1].p", "'besides'",
                     "triple_list[].p")


@pytest.mark.parametrize("key,box", [("s_bbox", [30, 10, 0, 5]), ("o_bbox", [0, 5, 9, 3])])
def test_inverted_box(tmp_path, good_records, key, box):
  good_records[BAD_INDEX]["triple_list"][0][key] = box
  _check_record_case(tmp_path, good_records, f"triple_list[0].{key}", "inverted box",
                     f"triple_list[].{key}")


@pytest.mark.parametrize("box", [[1, 2, 3], [1, 2, 3, 4.5], [1, 2, 3, "4"], "1,2,3,4",
                                 [True, 2, 3, 4]])
def test_malformed_box(tmp_path, good_records, box):
  good_records[BAD_INDEX]["triple_list"][0]["s_bbox"] = box
  _check_record_case(tmp_path, good_records, "triple_list[0].s_bbox", "4 ints",
                     "triple_list[].s_bbox")


@pytest.mark.parametrize("caption", ["", "   ", "\n\t"])
def test_empty_caption(tmp_path, good_records, caption):
  good_records[BAD_INDEX]["captions"].append(caption)
  n = len(good_records[BAD_INDEX]["captions"]) - 1
  _check_record_case(tmp_path, good_records, f"captions[{n}]", "empty caption", "captions[]")


@pytest.mark.parametrize("field,value", [
    ("captions", []), ("captions", "a string"), ("triple_list", []), ("img_id", ""),
    ("img_id", 1000001)])
def test_wrong_type_fields(tmp_path, good_records, field, value):
  good_records[BAD_INDEX][field] = value
  _check_record_case(tmp_path, good_records, field, "must be", field)


def test_record_not_an_object_and_duplicate_id(tmp_path, good_records):
  records = list(good_records)
  records[BAD_INDEX] = ["not", "an", "object"]
  path = _write(tmp_path, records)
  with pytest.raises(DataError, match=f"record {BAD_INDEX}: record must be a JSON object"):
    vsd.load_records(path)
  records[BAD_INDEX] = dict(good_records[0])
  _check_record_case(tmp_path, records, "img_id", "duplicate img_id", "img_id")


def test_several_bad_records_counted_per_reason(tmp_path, good_records):
  good_records[1]["triple_list"][0]["p"] = "atop"
  good_records[3]["triple_list"][0]["p"] = "near"
  good_records[4]["captions"] = [" "]
  good_records[5]["triple_list"][0]["s_bbox"] = [9, 1, 0, 1]
  report = vsd.LoadReport(max_messages=2)
  kept = vsd.load_records(_write(tmp_path, good_records), skip_bad=True, report=report)
  assert [r.index for r in kept] == [0, 2, 6, 7]
  assert report.skipped == {"triple_list[].p": 2, "captions[]": 1,
                            "triple_list[].s_bbox": 1}
  assert len(report.messages) == 2 and "record 1" in report.messages[0]


def _image_case(tmp_path, good_records, image_roots, damage):
  """Damages record BAD_INDEX's image; strict check raises, tolerant check skips it."""
  path = _write(tmp_path, good_records)
  records = vsd.load_records(path)
  image = vsd.resolve_image_path(records[BAD_INDEX].img_id, **image_roots)
  damage(image)
  with pytest.raises(DataError) as info:
    vsd.check_images(records, file=str(path), **image_roots)
  _assert_located(info.value, path, "img_id")
  report = vsd.LoadReport()
  kept = vsd.check_images(records, file=str(path), skip_bad=True, report=report,
                          **image_roots)
  assert [r.index for r in kept] == [i for i in range(len(records)) if i != BAD_INDEX]
  assert report.skipped == {"img_id": 1} and report.loaded == len(records) - 1
  assert report.messages == [str(info.value)]
  return info.value, image


def test_missing_image(tmp_path, good_records, image_roots):
  error, image = _image_case(tmp_path, good_records, image_roots, lambda p: p.unlink())
  assert image.name in str(error) and "not found" in str(error)
  # load_image itself also names the image, the JSON file and the record.
  with pytest.raises(DataError) as info:
    vsd.load_image(image, file="x.json", record=4)
  assert str(image) in str(info.value) and "x.json" in str(info.value)
  assert "record 4" in str(info.value) and "'img_id'" in str(info.value)


@pytest.mark.parametrize("damage", [
    lambda p: p.write_bytes(b"this is not an image"),
    lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),  # truncated
    lambda p: p.write_bytes(b""),
])
def test_corrupt_image(tmp_path, good_records, image_roots, damage):
  error, image = _image_case(tmp_path, good_records, image_roots, damage)
  assert str(image) in str(error) and "corrupt" in str(error)


def test_unknown_id_pattern_is_reported(tmp_path, good_records, image_roots):
  good_records[BAD_INDEX]["img_id"] = "image-0007"
  path = _write(tmp_path, good_records)
  records = vsd.load_records(path)  # ids are free-form at load time (spatial-scenes)
  with pytest.raises(DataError) as info:
    vsd.check_images(records, file=str(path), **image_roots)
  _assert_located(info.value, path, "img_id")
  assert "unrecognised img_id" in str(info.value)
