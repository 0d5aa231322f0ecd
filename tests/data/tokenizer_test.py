"""Tests for sd3_jax.data.tokenizer: training, reload, CLIP-format loading, fixed-length ids."""
import json
import re

import numpy as np
import pytest
import transformers

from sd3_jax.data import tokenizer as tokenizer_lib
from sd3_jax.data.schema import DataError

CAPTIONS = [
    "A red cube is to the left of the blue sphere.",
    "There is a small green cone behind the red cube!",
    "the blue sphere is on the large yellow cylinder.",
    "A yellow cylinder is in front of a green cone.",
]


def _words(text):
  return " ".join(re.findall(r"\w+|[^\w\s]+", text.lower()))


@pytest.mark.parametrize("kind", ["wordlevel", "bpe"])
def test_round_trip_and_special_ids(tmp_path, kind):
  tok = tokenizer_lib.train_tokenizer(CAPTIONS * 3, tmp_path / kind, 200, 24, kind=kind)
  info = tokenizer_lib.tokenizer_info(tok)
  assert (info["pad_id"], info["bos_id"], info["eos_id"], info["unk_id"]) == (0, 1, 2, 3)
  ids, mask = tokenizer_lib.encode_batch(tok, CAPTIONS, 24)
  assert ids.shape == mask.shape == (len(CAPTIONS), 24)
  assert ids.dtype == np.int32 and mask.dtype == bool
  lengths = mask.sum(1)
  for i, n in enumerate(lengths):
    assert ids[i, 0] == 1 and ids[i, n - 1] == 2
    assert np.all(ids[i, n:] == 0) and mask[i, :n].all()
  assert tokenizer_lib.decode_batch(tok, ids, mask) == [_words(c) for c in CAPTIONS]


def test_truncation_keeps_eos_and_unknown_words(tmp_path):
  tok = tokenizer_lib.train_tokenizer(CAPTIONS, tmp_path, 100, 6)
  ids, mask = tokenizer_lib.encode_batch(tok, [CAPTIONS[0], "zebra", ""], 6)
  assert mask[0].all() and ids[0, -1] == 2
  assert tokenizer_lib.decode_batch(tok, ids[:1]) == ["a red cube is"]
  assert ids[1, :3].tolist() == [1, 3, 2]  # <bos> <unk> <eos>
  assert ids[2, :2].tolist() == [1, 2] and mask[2].sum() == 2


def test_autotokenizer_reloads_identically(tmp_path):
  tok = tokenizer_lib.train_tokenizer(CAPTIONS, tmp_path, 100, 16)
  reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert reloaded.model_max_length == 16
  for text in CAPTIONS:
    assert reloaded(text)["input_ids"] == tok(text)["input_ids"]
  a = tokenizer_lib.encode_batch(tokenizer_lib.load_tokenizer(tmp_path), CAPTIONS, 16)
  b = tokenizer_lib.encode_batch(reloaded, CAPTIONS, 16)
  np.testing.assert_array_equal(a[0], b[0])


def test_vocab_size_is_respected(tmp_path):
  tok = tokenizer_lib.train_tokenizer(CAPTIONS, tmp_path, 10, 8)
  assert len(tok) <= 10
  with pytest.raises(ValueError, match="vocab_size"):
    tokenizer_lib.train_tokenizer(CAPTIONS, tmp_path / "x", 4, 8)
  with pytest.raises(ValueError, match="kind"):
    tokenizer_lib.train_tokenizer(CAPTIONS, tmp_path / "y", 50, 8, kind="unigram")


def _write_clip_files(path):
  """A tiny CLIP-format BPE: characters, their word-final forms, a few merges."""
  chars = "abcdefghijklmnopqrstuvwxyz."
  vocab = {c: i for i, c in enumerate(chars)}
  vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
  merges = ["r e", "re d</w>", "c u", "cu b", "cub e</w>"]
  for m in merges:
    vocab[m.replace(" ", "")] = len(vocab)
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  path.mkdir()
  (path / "vocab.json").write_text(json.dumps(vocab))
  (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  return vocab


def test_local_clip_tokenizer(tmp_path):
  vocab = _write_clip_files(tmp_path / "clip")
  tok = tokenizer_lib.load_tokenizer(tmp_path / "clip")
  assert tok.tokenize("A red cube.") == ["a</w>", "red</w>", "cube</w>", ".</w>"]
  ids, mask = tokenizer_lib.encode_batch(tok, ["A red cube.", "red"], 8)
  sot, eot = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
  assert ids[0].tolist() == [sot, vocab["a</w>"], vocab["red</w>"], vocab["cube</w>"],
                             vocab[".</w>"], eot, eot, eot]
  assert mask.sum(1).tolist() == [6, 3]
  assert tokenizer_lib.decode_batch(tok, ids, mask)[1] == "red"


def test_load_errors(tmp_path):
  with pytest.raises(DataError, match="not found"):
    tokenizer_lib.load_tokenizer(tmp_path / "missing")
  with pytest.raises(DataError, match="vocab.json"):
    tokenizer_lib.load_tokenizer(tmp_path)
