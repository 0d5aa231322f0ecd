"""SI2T text metrics, compatible with the COCO caption evaluator (pycocoevalcap 1.2).

The COCO evaluator (`pycocoevalcap.eval.COCOEvalCap`) first tokenises every caption with
Stanford's PTBTokenizer (Java, `-preserveLines -lowerCase`) and drops punctuation tokens,
then hands the space-joined tokens to its scorers. Here:

* `ptb_tokenize` reimplements that tokenisation in Python for captions (checked token for
  token against the Java tokenizer on the VSD captions), so BLEU and CIDEr need no Java;
* `bleu` and `cider` reimplement pycocoevalcap's `Bleu(4)` (corpus BLEU, "closest"
  reference length) and `Cider()` (CIDEr-D) exactly, including their smoothing constants;
* `meteor` and `spice` run pycocoevalcap's own jars when a Java runtime and the jars'
  model files are present, and otherwise raise `ScorerUnavailable` naming what is missing;
* `triplet_recall` is the paper's TriRec over (subject, predicate, object) triples, with a
  caption parser given as an argument for generated text.

All caption arguments follow the evaluator's format: `{id: [caption, ...]}`, with exactly
one hypothesis per id and at least one reference per id.
"""
import collections
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import threading
from typing import Callable, Hashable, Mapping, Optional, Sequence

from sd3_jax.data import schema

Captions = Mapping[Hashable, Sequence[str]]
Triple = tuple

# pycocoevalcap's PTBTokenizer drops these tokens after tokenising. "-LRB-" etc. never
# match there because the tokenizer lower-cases them first ("-lrb-"): kept as is.
PUNCTUATIONS = ("''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                ".", "?", "!", ",", ":", "-", "--", "...", ";")
_PUNCT = frozenset(PUNCTUATIONS)

# Tokens PTBTokenizer keeps whole with their final period (it only splits a period that
# ends a plain word).
_ABBREVIATIONS = frozenset((
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "mt", "ft", "vs", "etc", "inc",
    "ltd", "co", "corp", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept",
    "oct", "nov", "dec", "no", "gen", "gov", "sen", "rep", "rev", "capt", "col", "lt",
    "sgt", "ave", "blvd", "rd", "bros", "approx", "dept", "est"))
# Words PTB splits in two (Penn Treebank conventions).
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me")}
_CLITIC = re.compile(r"^(.+?)(n't|'s|'m|'d|'re|'ve|'ll)$")

_WORD = r"[^\W_]+(?:(?:['/&]|-+)[^\W_]+)*"
_TOKEN = re.compile(
    r"(?P<abbr>[^\W\d_](?:\.[^\W\d_])+\.?|(?:" + "|".join(sorted(_ABBREVIATIONS)) +
    r")\.(?=\s|$))"
    r"|(?P<num>\d+(?:[.,:]\d+)+)"
    r"|(?P<tag>[@#]" + _WORD + r")"
    r"|(?P<word>" + _WORD + r")"
    r"|(?P<dots>\.\.\.+|\?+|!+|--+|``|'')"
    r"|(?P<quote>\")"
    r"|(?P<bracket>[()\[\]{}])"
    r"|(?P<other>\S)")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-",
             "}": "-rcb-"}


class ScorerUnavailable(RuntimeError):
  """A Java-based scorer cannot run here; the message names exactly what is missing."""


def _split_word(word: str) -> list[str]:
  if word in _SPLIT_WORDS:
    return list(_SPLIT_WORDS[word])
  m = _CLITIC.match(word)
  if m:
    return [m.group(1), m.group(2)]
  return [word]


def ptb_tokenize(caption: str) -> str:
  """One caption -> its space-joined tokens as the COCO evaluator scores them.

  Equivalent to PTBTokenizer(-preserveLines -lowerCase) followed by the evaluator's
  punctuation removal for plain English captions: lower-cased, clitics split ("it 's",
  "do n't"), punctuation and quotes dropped, hyphenated words, numbers ("3.5", "1,000")
  and dotted abbreviations ("t.c.", "mr.") kept whole.
  """
  tokens = []
  for m in _TOKEN.finditer(caption.lower().replace("\n", " ")):
    kind, text = m.lastgroup, m.group()
    if kind == "word":
      tokens.extend(_split_word(text))
    elif kind == "bracket":
      tokens.append(_BRACKETS[text])
    elif kind != "quote":  # a '"' becomes `` or '', both dropped
      tokens.append(text)
  return " ".join(t for t in tokens if t not in _PUNCT)


def tokenize_captions(captions: Captions) -> dict:
  """{id: [caption]} -> {id: [tokenised caption]} (the evaluator's first step)."""
  return {k: [ptb_tokenize(c) for c in v] for k, v in captions.items()}


def _check(refs: Captions, hyps: Captions, *, name: str) -> list:
  """Validates the evaluator's input contract; returns the ids in a fixed order."""
  if set(refs) != set(hyps):
    missing = sorted(map(str, set(refs) ^ set(hyps)))[:5]
    raise schema.DataError(f"{name}: refs and hyps must have the same ids; "
                           f"mismatched ids include {missing}", field="captions")
  if not refs:
    raise schema.DataError(f"{name}: no captions to score", field="captions")
  ids = list(refs)
  for i, k in enumerate(ids):
    if isinstance(hyps[k], str) or len(hyps[k]) != 1:
      raise schema.DataError(f"{name}: id {k!r} needs exactly one hypothesis, got "
                             f"{hyps[k]!r}", record=i, field="hyps")
    if isinstance(refs[k], str) or len(refs[k]) < 1:
      raise schema.DataError(f"{name}: id {k!r} needs a list of >= 1 references, got "
                             f"{refs[k]!r}", record=i, field="refs")
  return ids


def _ngrams(words: Sequence[str], n: int) -> collections.Counter:
  return collections.Counter(tuple(words[i:i + k]) for k in range(1, n + 1)
                             for i in range(len(words) - k + 1))


def bleu(refs: Captions, hyps: Captions, *, n: int = 4,
         tokenize: bool = True) -> list[float]:
  """Corpus BLEU-1..n exactly as pycocoevalcap's `Bleu(n)` (closest reference length).

  Args:
    refs: {id: [reference caption, ...]}.
    hyps: {id: [generated caption]}.
    n: highest n-gram order.
    tokenize: apply `ptb_tokenize` first (False: captions are already tokenised).

  Returns:
    [BLEU-1, ..., BLEU-n] in [0, 1].
  """
  ids = _check(refs, hyps, name="bleu")
  if tokenize:
    refs, hyps = tokenize_captions(refs), tokenize_captions(hyps)
  # pycocoevalcap's constants: `tiny` keeps a zero match count at ~0 instead of 0/0.
  tiny, small = 1e-15, 1e-9
  correct, guess = [0] * n, [0] * n
  testlen = reflen = 0
  for k in ids:
    words = hyps[k][0].split()
    counts = _ngrams(words, n)
    maxref = collections.Counter()
    lens = []
    for r in refs[k]:
      rw = r.split()
      lens.append(len(rw))
      maxref |= _ngrams(rw, n)
    testlen += len(words)
    reflen += min((abs(l - len(words)), l) for l in lens)[1]
    for g, c in counts.items():
      correct[len(g) - 1] += min(maxref.get(g, 0), c)
    for j in range(n):
      guess[j] += max(0, len(words) - j)
  scores, prod = [], 1.0
  for j in range(n):
    prod *= (correct[j] + tiny) / (guess[j] + small)
    scores.append(prod ** (1.0 / (j + 1)))
  ratio = (testlen + tiny) / (reflen + small)
  if ratio < 1:
    scores = [s * math.exp(1 - 1 / ratio) for s in scores]
  return scores


def cider(refs: Captions, hyps: Captions, *, n: int = 4, sigma: float = 6.0,
          tokenize: bool = True) -> float:
  """Corpus CIDEr-D exactly as pycocoevalcap's `Cider()`.

  tf-idf n-gram vectors (document frequencies over the reference sets of this corpus),
  clipped cosine similarity per n, a Gaussian length penalty (σ = `sigma`), averaged over
  n and references, ×10, then averaged over ids. As in pycocoevalcap, the "length" in the
  penalty is the number of bigrams of a caption.
  """
  ids = _check(refs, hyps, name="cider")
  if tokenize:
    refs, hyps = tokenize_captions(refs), tokenize_captions(hyps)
  crefs = [[_ngrams(r.split(), n) for r in refs[k]] for k in ids]
  ctest = [_ngrams(hyps[k][0].split(), n) for k in ids]
  df = collections.Counter()
  for rs in crefs:
    df.update({g for r in rs for g in r})
  log_docs = math.log(float(len(crefs)))

  def vec(counts):
    v = [dict() for _ in range(n)]
    norm = [0.0] * n
    length = 0
    for g, tf in counts.items():
      j = len(g) - 1
      w = float(tf) * (log_docs - math.log(max(1.0, df.get(g, 0.0))))
      v[j][g] = w
      norm[j] += w * w
      if j == 1:
        length += tf
    return v, [math.sqrt(x) for x in norm], length

  scores = []
  for test, rs in zip(ctest, crefs):
    vh, nh, lh = vec(test)
    total = [0.0] * n
    for r in rs:
      vr, nr, lr = vec(r)
      penalty = math.exp(-(float(lh - lr) ** 2) / (2 * sigma ** 2))
      for j in range(n):
        val = sum(min(w, vr[j].get(g, 0.0)) * vr[j].get(g, 0.0) for g, w in vh[j].items())
        if nh[j] != 0 and nr[j] != 0:
          val /= nh[j] * nr[j]
        total[j] += val * penalty
    scores.append(sum(total) / n / len(rs) * 10.0)
  return sum(scores) / len(scores)


# --- Java-based scorers -------------------------------------------------------------------


def _pycocoevalcap_dir() -> pathlib.Path:
  try:
    import pycocoevalcap  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ScorerUnavailable("pycocoevalcap is not installed (pip install "
                            "pycocoevalcap==1.2); it ships the METEOR/SPICE jars") from e
  return pathlib.Path(list(pycocoevalcap.__path__)[0])


def _find_java(java: Optional[str]) -> str:
  path = shutil.which(java or "java")
  if path is None:
    raise ScorerUnavailable(f"no Java runtime: {java or 'java'!r} is not on PATH "
                            "(install a JRE, e.g. OpenJDK 17)")
  return path


def _require_files(scorer: str, files: Sequence[pathlib.Path], hint: str = ""):
  missing = [str(f) for f in files if not f.exists()]
  if missing:
    raise ScorerUnavailable(f"{scorer} needs {', '.join(missing)}; not found{hint}")


def meteor_status(*, meteor_dir: Optional[str] = None,
                  java: Optional[str] = None) -> Optional[str]:
  """None when `meteor` can run here, else the message saying what is missing."""
  try:
    _meteor_files(meteor_dir, java)
  except ScorerUnavailable as e:
    return str(e)
  return None


def _meteor_files(meteor_dir, java):
  java = _find_java(java)
  d = pathlib.Path(meteor_dir) if meteor_dir else _pycocoevalcap_dir() / "meteor"
  jar = d / "meteor-1.5.jar"
  _require_files("METEOR", [jar, d / "data" / "paraphrase-en.gz"],
                 " (they ship with pycocoevalcap 1.2 under pycocoevalcap/meteor)")
  return java, jar


def meteor(refs: Captions, hyps: Captions, *, meteor_dir: Optional[str] = None,
           java: Optional[str] = None, timeout_s: float = 300.0,
           tokenize: bool = True) -> float:
  """Corpus METEOR 1.5 via pycocoevalcap's jar and protocol (`Meteor().compute_score`).

  Raises:
    ScorerUnavailable: no Java runtime or no jar/paraphrase table in `meteor_dir`
      (default: pycocoevalcap's), or the jar failed or ran past `timeout_s`.
  """
  ids = _check(refs, hyps, name="meteor")
  java, jar = _meteor_files(meteor_dir, java)
  if tokenize:
    refs, hyps = tokenize_captions(refs), tokenize_captions(hyps)
  cmd = [java, "-jar", "-Xmx2G", jar.name, "-", "-", "-stdio", "-l", "en", "-norm"]
  proc = subprocess.Popen(cmd, cwd=jar.parent, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  # The jar answers line by line; a watchdog kills it so a stuck JVM cannot hang us.
  timer = threading.Timer(timeout_s, proc.kill)
  timer.start()
  try:
    def ask(line: str) -> str:
      proc.stdin.write((line + "\n").encode())
      proc.stdin.flush()
      out = proc.stdout.readline().decode().strip()
      if not out:
        raise ScorerUnavailable(f"METEOR jar {jar} stopped answering (timeout "
                                f"{timeout_s}s or crash): "
                                f"{proc.stderr.read().decode(errors='replace')[-500:]}")
      return out

    stats = []
    for k in ids:
      hyp = hyps[k][0].replace("|||", "").replace("  ", " ")
      stats.append(ask(" ||| ".join(("SCORE", " ||| ".join(refs[k]), hyp))))
    proc.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode())
    proc.stdin.flush()
    lines = [proc.stdout.readline().decode().strip() for _ in range(len(ids) + 1)]
    if not all(lines):
      raise ScorerUnavailable(f"METEOR jar {jar} returned too few scores")
    return float(lines[-1])
  finally:
    timer.cancel()
    proc.kill()
    proc.wait()


SPICE_CORENLP = "stanford-corenlp-3.6.0"


def _spice_files(spice_dir, java):
  java = _find_java(java)
  d = pathlib.Path(spice_dir) if spice_dir else _pycocoevalcap_dir() / "spice"
  jar = d / "spice-1.0.jar"
  _require_files("SPICE", [jar], " (it ships with pycocoevalcap 1.2 under "
                 "pycocoevalcap/spice)")
  lib = d / "lib"
  corenlp = [lib / f"{SPICE_CORENLP}.jar", lib / f"{SPICE_CORENLP}-models.jar"]
  if not all(f.exists() for f in corenlp):
    raise ScorerUnavailable(
        f"SPICE needs {SPICE_CORENLP} jars in {lib} ({corenlp[0].name}, "
        f"{corenlp[1].name}); not found. pycocoevalcap downloads them from "
        "nlp.stanford.edu (stanford-corenlp-full-2015-12-09.zip) at first use; copy them "
        "there by hand on a machine without internet")
  return java, jar


def spice_status(*, spice_dir: Optional[str] = None,
                 java: Optional[str] = None) -> Optional[str]:
  """None when `spice` can run here, else the message saying what is missing."""
  try:
    _spice_files(spice_dir, java)
  except ScorerUnavailable as e:
    return str(e)
  return None


def spice(refs: Captions, hyps: Captions, *, spice_dir: Optional[str] = None,
          java: Optional[str] = None, timeout_s: float = 600.0,
          tokenize: bool = True) -> float:
  """Mean SPICE F-score via pycocoevalcap's `spice-1.0.jar` (as `Spice().compute_score`).

  Unlike pycocoevalcap this never downloads: missing CoreNLP jars raise.

  Raises:
    ScorerUnavailable: no Java runtime, no spice jar, or no Stanford CoreNLP 3.6.0 jars in
      `<spice_dir>/lib`; or the jar failed or ran past `timeout_s`.
  """
  ids = _check(refs, hyps, name="spice")
  java, jar = _spice_files(spice_dir, java)
  if tokenize:
    refs, hyps = tokenize_captions(refs), tokenize_captions(hyps)
  with tempfile.TemporaryDirectory() as tmp:
    inp, out = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
    with open(inp, "w") as f:
      json.dump([{"image_id": str(k), "test": hyps[k][0], "refs": list(refs[k])}
                 for k in ids], f)
    cmd = [java, "-jar", "-Xmx8G", jar.name, inp, "-cache", os.path.join(tmp, "cache"),
           "-out", out, "-subset", "-silent"]
    try:
      subprocess.run(cmd, cwd=jar.parent, check=True, timeout=timeout_s,
                     capture_output=True)
    except subprocess.TimeoutExpired as e:
      raise ScorerUnavailable(f"SPICE ran past {timeout_s}s") from e
    except subprocess.CalledProcessError as e:
      raise ScorerUnavailable(f"SPICE jar failed: {e.stderr.decode()[-500:]}") from e
    with open(out) as f:
      results = json.load(f)
  scores = []
  for item in results:
    try:
      scores.append(float(item["scores"]["All"]["f"]))
    except (TypeError, ValueError):
      scores.append(float("nan"))
  return sum(scores) / len(scores)


# --- TriRec ------------------------------------------------------------------------------


def triplet_recall(pred_triples: Sequence[Sequence[Triple]],
                   gold_triples: Sequence[Sequence[Triple]]) -> float:
  """Corpus TriRec = Σ|PT ∩ GT| / Σ|GT| with multiset intersection per example.

  `pred_triples[i]` and `gold_triples[i]` are the (subject, predicate, object) triples of
  example i. Examples without gold triples add nothing; a corpus without any is an error.
  (Graph-level TriRec on `SceneGraph`s is `sd3_jax.data.graphs.triple_recall`.)
  """
  if len(pred_triples) != len(gold_triples):
    raise schema.DataError(f"triplet_recall: {len(pred_triples)} predictions for "
                           f"{len(gold_triples)} gold examples", field="triples")
  hits = total = 0
  for pred, gold in zip(pred_triples, gold_triples):
    g = collections.Counter(map(tuple, gold))
    hits += sum((collections.Counter(map(tuple, pred)) & g).values())
    total += sum(g.values())
  if total == 0:
    raise schema.DataError("triplet_recall: no gold triples", field="triples")
  return hits / total


def caption_triplet_recall(hyps: Sequence[str],
                           gold_triples: Sequence[Sequence[Triple]],
                           parser: Callable[[str], Sequence[Triple]]) -> float:
  """TriRec of generated captions: `parser` (e.g. `scene_captions.parse_caption`) extracts
  each caption's triples, which are matched against that example's gold triples."""
  return triplet_recall([parser(h) for h in hyps], gold_triples)
