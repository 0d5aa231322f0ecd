"""Text tokenizers: train a small one on the captions, load it (or a local CLIP one), encode.

The embedded benchmark trains its own small tokenizer (`tokenizers` library, lowercase,
punctuation split) and saves it as a `transformers.PreTrainedTokenizerFast`, so that
`transformers.AutoTokenizer.from_pretrained(dir)` reloads it. Paper-scale configs point
at a local CLIP tokenizer directory instead (paper.md: CLIP tokenizer, length 77).

Special tokens of the trained tokenizer: `<pad>` = 0, `<bos>` = 1, `<eos>` = 2, `<unk>` = 3.
Every encoded sequence is `<bos> ... <eos>` followed by padding (`<eos>` is appended where
a tokenizer does not add it, as GPT-2's).
"""
import os
import pathlib
from typing import Iterable, Sequence, Union

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
import transformers

from sd3_jax.data.schema import DataError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # index = token id

PathLike = Union[str, os.PathLike]


def train_tokenizer(captions: Iterable[str], out_dir: PathLike, vocab_size: int,
                    max_len: int, *, kind: str = "wordlevel",
                    min_frequency: int = 1) -> transformers.PreTrainedTokenizerFast:
  """Trains a word-level or BPE tokenizer on `captions` and saves it in `out_dir`.

  Args:
    captions: training texts.
    out_dir: directory written in `transformers` format (tokenizer.json + configs).
    vocab_size: maximum vocabulary size, special tokens included.
    max_len: the sequence length the tokenizer is used with (saved as
      `model_max_length`).
    kind: 'wordlevel' (one id per lowercase word or punctuation mark; unseen words map to
      `<unk>`) or 'bpe' (sub-words; no unknown words on lowercase ASCII text).
    min_frequency: minimum count of a word (or merge) to enter the vocabulary.

  Returns:
    The trained tokenizer, as reloaded by `load_tokenizer(out_dir)`.
  """
  if vocab_size <= len(SPECIAL_TOKENS):
    raise ValueError(f"vocab_size={vocab_size} leaves no room beside the special tokens")
  if max_len < 2:
    raise ValueError(f"max_len={max_len} cannot hold <bos> and <eos>")
  if kind == "wordlevel":
    tok = tokenizers.Tokenizer(models.WordLevel(unk_token=UNK))
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS))
  elif kind == "bpe":
    tok = tokenizers.Tokenizer(models.BPE(unk_token=UNK, end_of_word_suffix="</w>"))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  end_of_word_suffix="</w>")
    # The suffix marks word ends, so decoding restores the spaces between words.
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
  else:
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'wordlevel' or 'bpe'")
  tok.normalizer = normalizers.Sequence(
      [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Strip()])
  # `Whitespace` splits on \w+|[^\w\s]+: words and runs of punctuation become tokens.
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator((c for c in captions), trainer=trainer)
  for i, special in enumerate(SPECIAL_TOKENS):
    if tok.token_to_id(special) != i:
      raise AssertionError(f"special token {special} did not get id {i}")
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A {EOS}", special_tokens=[(BOS, 1), (EOS, 2)])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
      model_max_length=max_len, clean_up_tokenization_spaces=False)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  fast.save_pretrained(str(out_dir))
  return load_tokenizer(out_dir)


def load_tokenizer(path: PathLike) -> transformers.PreTrainedTokenizerBase:
  """Loads a tokenizer saved by `train_tokenizer`, any `transformers` tokenizer directory,
  or a bare local CLIP tokenizer directory (just `vocab.json` + `merges.txt`)."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise DataError("tokenizer directory not found", file=str(path))
  if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
    return transformers.AutoTokenizer.from_pretrained(str(path))
  if (path / "vocab.json").exists() and (path / "merges.txt").exists():
    # AutoTokenizer cannot tell the class without a config; CLIP's files say it all.
    return transformers.CLIPTokenizerFast.from_pretrained(str(path))
  raise DataError("no tokenizer.json, tokenizer_config.json or vocab.json + merges.txt",
                  file=str(path))


def _pad_id(tok: transformers.PreTrainedTokenizerBase) -> int:
  # CLIP pads with <|endoftext|>; a tokenizer without a pad token pads with <eos> too.
  for candidate in (tok.pad_token_id, tok.eos_token_id):
    if candidate is not None:
      return int(candidate)
  raise ValueError("tokenizer has neither a pad nor an eos token")


def encode_batch(tok: transformers.PreTrainedTokenizerBase, texts: Sequence[str],
                 max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Encodes texts to fixed-length ids.

  Sequences longer than `max_len` are cut and end with `<eos>` (the model always sees
  where the text ends); shorter ones are padded with the pad id.

  Returns:
    (ids int32 [B, max_len], mask bool [B, max_len]); mask is True on real tokens.
  """
  texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
  ids = np.full((len(texts), max_len), _pad_id(tok), np.int32)
  mask = np.zeros((len(texts), max_len), bool)
  if not texts:
    return ids, mask
  encoded = tok(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
  eos = tok.eos_token_id
  for i, seq in enumerate(encoded):
    if eos is not None and (not seq or seq[-1] != eos):
      seq = seq + [eos]  # GPT-2's tokenizer adds no <eos>; a decoder must learn to stop
    if len(seq) > max_len:
      seq = seq[:max_len]
      if eos is not None:
        seq[-1] = eos
    ids[i, :len(seq)] = seq
    mask[i, :len(seq)] = True
  return ids, mask


def decode_batch(tok: transformers.PreTrainedTokenizerBase, ids: np.ndarray,
                 mask: np.ndarray | None = None) -> list[str]:
  """Decodes [B, L] ids to strings, dropping special tokens and everything after `<eos>`.

  `mask` (optional, [B, L] bool) drops masked positions first, e.g. padding.
  """
  ids = np.asarray(ids)
  eos = tok.eos_token_id
  out = []
  for i, row in enumerate(ids):
    row = row[np.asarray(mask[i], bool)] if mask is not None else row
    row = [int(t) for t in row]
    # The first token may be <bos>; a generated sequence ends at its first <eos>.
    start = 1 if row and row[0] == tok.bos_token_id and tok.bos_token_id != eos else 0
    if eos is not None and eos in row[start:]:
      row = row[:row.index(eos, start)]
    out.append(tok.decode(row, skip_special_tokens=True).strip())
  return out


def tokenizer_info(tok: transformers.PreTrainedTokenizerBase) -> dict:
  """Sizes a model config needs: vocab size and the special ids."""
  return {"vocab_size": len(tok), "pad_id": _pad_id(tok), "bos_id": tok.bos_token_id,
          "eos_id": tok.eos_token_id, "unk_id": tok.unk_token_id}

