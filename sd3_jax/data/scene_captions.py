"""Caption grammar of the spatial scenes: two generators and the parser that inverts both.

An object is described by a noun phrase "(a|an|the) [size] colour [shape]"; colours are
unique within a scene, so the colour identifies the object. A description ("desc") is that
phrase without its article, e.g. "small red cube".

* `caption_v1`: templated, lower-case, VSDv1-like; one sentence per relation, with the
  canonical predicate strings ("the red cube is to the left of the blue sphere.").
* `caption_v2`: longer and varied, VSDv2-like: predicate synonyms, verbs, inverted clauses
  ("Behind the red cube stands a large blue sphere"), possessive left/right ("The blue
  sphere has the red cube on its left"), relative clauses that continue from the last
  mentioned object (", which is next to the green cone") and ", and"/", while" joins.
* `parse_caption`: clauses -> (subject desc, VSD predicate, object desc). A relative
  clause's subject is the last noun phrase of the clause before it; a clause whose
  predicate precedes its first noun phrase is inverted (subject last).
"""
import re
from typing import NamedTuple, Optional, Sequence

import numpy as np

from sd3_jax.data import schema

COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple")
SIZES = ("small", "large")
SHAPES = ("cube", "sphere", "cylinder", "cone", "pyramid", "chair", "object")

# predicate -> [(phrase, usable in an inverted clause)]
SYNONYMS = {
    "to the left of": [("to the left of", True), ("left of", False),
                       ("on the left side of", True)],
    "to the right of": [("to the right of", True), ("right of", False),
                        ("on the right side of", True)],
    "behind": [("behind", True), ("in back of", True), ("farther away than", False),
               ("further back than", False)],
    "in front of": [("in front of", True), ("closer to the camera than", False),
                    ("nearer than", False)],
    "on": [("on", True), ("on top of", True), ("atop", True), ("upon", False)],
    "under": [("under", True), ("below", True), ("beneath", True), ("underneath", True)],
    "next to": [("next to", True), ("beside", True), ("close to", False),
                ("right next to", True), ("by the side of", True)],
    "above": [("above", True), ("over", True), ("higher than", False)],
    "in": [("in", True), ("inside", True)],
}
# "B has A on its left" == "A to the left of B".
POSSESSIVE = {"on its left": "to the left of", "to its left": "to the left of",
              "on its left side": "to the left of", "on its right": "to the right of",
              "to its right": "to the right of", "on its right side": "to the right of"}
VERBS = ("is", "stands", "sits", "rests", "is placed", "is located", "can be seen")
INVERTED_VERBS = ("stands", "sits", "is", "rests", ", there is")

_PHRASE_TO_PRED = {ph: p for p, phs in SYNONYMS.items() for ph, _ in phs}
_PHRASE_TO_PRED.update(POSSESSIVE)
_PRED_RE = re.compile(r"\b(" + "|".join(
    re.escape(ph) for ph in sorted(_PHRASE_TO_PRED, key=len, reverse=True)) + r")\b")
_NP_RE = re.compile(r"\b(?:a|an|the)\s+(?:(small|large)\s+)?(" + "|".join(COLOURS)
                    + r")\b(?:\s+(" + "|".join(SHAPES) + r")\b)?")
_CLAUSE_SPLIT = re.compile(r",\s*(?:and|while)\s+|;\s*|,\s*(?=which\b)")


class ObjectDesc(NamedTuple):
  colour: str
  size: Optional[str] = None
  shape: Optional[str] = None

  def text(self) -> str:
    return " ".join(w for w in (self.size, self.colour, self.shape) if w)


Triple = tuple[str, str, str]


def parse_desc(desc: str) -> ObjectDesc:
  """"small red cube" / "red" / "red cube" -> ObjectDesc; DataError without a colour."""
  words = desc.lower().split()
  colour = [w for w in words if w in COLOURS]
  if len(colour) != 1:
    raise schema.DataError(f"description {desc!r} names no single colour", field="desc")
  size = next((w for w in words if w in SIZES), None)
  shape = next((w for w in words if w in SHAPES), None)
  return ObjectDesc(colour[0], size, shape)


def _np(d: ObjectDesc, article: str) -> str:
  text = d.text()
  if article == "a" and text[0] in "aeiou":
    article = "an"
  return f"{article} {text}"


def _pick_desc(obj: ObjectDesc, rng, p_size: float) -> ObjectDesc:
  return ObjectDesc(obj.colour, obj.size if rng.random() < p_size else None, obj.shape)


def caption_v1(objects: Sequence[ObjectDesc], described: Sequence[tuple[int, str, int]],
               rng: np.random.Generator) -> tuple[str, list[Triple]]:
  """Templated caption of the relations (i, predicate, j); returns (text, triples)."""
  sents, triples = [], []
  for i, p, j in described:
    s, o = _pick_desc(objects[i], rng, 0.4), _pick_desc(objects[j], rng, 0.4)
    form = int(rng.integers(3))
    if form == 0:
      sents.append(f"{_np(s, 'the')} is {p} {_np(o, 'the')}.")
    elif form == 1:
      sents.append(f"there is {_np(s, 'a')} {p} {_np(o, 'the')}.")
    else:
      sents.append(f"{_np(s, 'a')} is {p} {_np(o, 'a')}.")
    triples.append((s.text(), p, o.text()))
  return " ".join(sents), triples


def _choice(rng, seq):
  return seq[int(rng.integers(len(seq)))]


def caption_v2(objects: Sequence[ObjectDesc], described: Sequence[tuple[int, str, int]],
               rng: np.random.Generator) -> tuple[str, list[Triple]]:
  """Varied, longer caption of the relations (i, predicate, j); returns (text, triples)."""
  sentences: list[str] = []
  triples = []
  last = None  # (object index, desc) of the last noun phrase written
  for i, p, j in described:
    s, o = _pick_desc(objects[i], rng, 0.6), _pick_desc(objects[j], rng, 0.6)
    art = lambda: _choice(rng, ("a", "the"))  # pylint: disable=cell-var-from-loop
    phrase, invertible = _choice(rng, SYNONYMS[p])
    if sentences and last[0] == i and rng.random() < 0.7:
      s = last[1]  # "which" stands for the phrase as written
      sentences[-1] += f", which {_choice(rng, VERBS)} {phrase} {_np(o, 'the')}"
      last = (j, o)
    else:
      form = rng.random()
      if p in ("to the left of", "to the right of") and form < 0.25:
        side = "left" if p == "to the left of" else "right"
        poss = _choice(rng, (f"on its {side}", f"to its {side}", f"on its {side} side"))
        clause = f"{_np(o, 'the')} has {_np(s, art())} {poss}"
        last = (i, s)
      elif invertible and form < 0.55:
        verb = _choice(rng, INVERTED_VERBS)
        sep = "" if verb.startswith(",") else " "
        clause = f"{phrase} {_np(o, 'the')}{sep}{verb} {_np(s, art())}"
        last = (i, s)
      else:
        clause = f"{_np(s, art())} {_choice(rng, VERBS)} {phrase} {_np(o, 'the')}"
        last = (j, o)
      if sentences and rng.random() < 0.5:
        sentences[-1] += _choice(rng, (", and ", ", while ")) + clause
      else:
        sentences.append(clause[0].upper() + clause[1:])
    triples.append((s.text(), p, o.text()))
  return " ".join(x + "." for x in sentences), triples


def _parse_clause(clause: str, prev_last: Optional[str]):
  """One clause -> (triple or None, last noun phrase desc of the clause)."""
  nps = [(m.start(), m.end(), ObjectDesc(m.group(2), m.group(1), m.group(3)).text())
         for m in _NP_RE.finditer(clause)]
  residual = clause
  for a, b, _ in reversed(nps):
    residual = residual[:a] + "@" * (b - a) + residual[b:]
  preds = list(_PRED_RE.finditer(residual))
  last = nps[-1][2] if nps else prev_last
  if len(preds) != 1:
    return None, last
  m = preds[0]
  pred = _PHRASE_TO_PRED[m.group(1)]
  if clause.startswith("which"):
    if prev_last is None or len(nps) != 1:
      return None, last
    return (prev_last, pred, nps[0][2]), last
  if len(nps) != 2:
    return None, last
  (_, _, first), (_, _, second) = nps
  if m.group(1) in POSSESSIVE or m.start() < nps[0][0]:
    return (second, pred, first), last
  return (first, pred, second), last


def parse_caption(text: str, strict: bool = False) -> list[Triple]:
  """Caption -> [(subject desc, predicate, object desc)] in order of mention.

  Clauses that do not fit the grammar are skipped, or raise `DataError` if `strict`.
  """
  out = []
  for sentence in re.split(r"[.!?]", text.lower()):
    last = None
    for clause in _CLAUSE_SPLIT.split(sentence.strip()):
      clause = clause.strip()
      if not clause:
        continue
      triple, last = _parse_clause(clause, last)
      if triple is None:
        if strict:
          raise schema.DataError(f"clause {clause!r} of {text!r} does not parse",
                                 field="caption")
        continue
      out.append(triple)
  return out
