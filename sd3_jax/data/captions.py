"""Rule-based caption -> (subject, predicate, object) parser over VSD's 9 predicates.

VSD captions are short spatial descriptions ("there is a lamp next to the sofa.", "The man
with a black backpack has a suitcase on his left."). The parser finds every phrase of
`PREDICATE_SYNONYMS` in the caption, picks the one that carries the main relation (the one
between the hinted subject and object, else the first one after the main verb, since
relation phrases before it usually modify the subject: "the man on the left is ..."), and
takes the noun phrase before it as the subject and the one after it as the object.

Used to build text scene graphs (TSGs) from captions, where the caption's relation may
differ from the annotated one. `python -m sd3_jax.data.captions FILE.json...` prints how
often the parsed predicate agrees with the annotated one.
"""
import json
import re
import sys
from typing import Optional, Sequence

from sd3_jax.data import schema

Triple = tuple[str, str, str]

# Surface phrase -> VSD predicate. Longest match wins, so "in front of" beats "in" and
# "on top of" beats "on".
PREDICATE_SYNONYMS: dict[str, str] = {
    # on
    "on": "on", "on top of": "on", "upon": "on", "onto": "on", "atop": "on",
    "on to": "on", "resting on": "on", "sitting on": "on", "lying on": "on",
    # behind
    "behind": "behind", "in back of": "behind", "at the back of": "behind",
    "in the back of": "behind", "beyond": "behind", "back of": "behind",
    # in front of
    "in front of": "in front of", "in front": "in front of", "ahead of": "in front of",
    "at the front of": "in front of", "before": "in front of",
    # above
    "above": "above", "over": "above", "higher than": "above", "up above": "above",
    # next to
    "next to": "next to", "beside": "next to", "besides": "next to", "near": "next to",
    "nearby": "next to", "close to": "next to", "near to": "next to",
    "alongside": "next to", "adjacent to": "next to", "by the side of": "next to",
    "on the side of": "next to", "at the side of": "next to", "along": "next to",
    "by": "next to",
    # under
    "under": "under", "below": "under", "beneath": "under", "underneath": "under",
    "underneath of": "under", "lower than": "under", "down below": "under",
    # in
    "in": "in", "inside": "in", "inside of": "in", "within": "in", "into": "in",
    "among": "in", "amongst": "in",
}
for _side in ("left", "right"):
  _pred = f"to the {_side} of"
  for _phrase in (
      "to the {s} of", "{s} of", "on the {s} of", "on the {s} side of",
      "to the {s} side of", "at the {s} of", "at the {s} side of", "on {s} of",
      "on {s} side of", "on {s} side", "on {s}", "to {s} of", "to the {s}",
      "on the {s}", "{s} side of", "on the {s} hand side of", "to the {s} hand side of"):
    PREDICATE_SYNONYMS[_phrase.format(s=_side)] = _pred
del _side, _pred, _phrase
assert set(PREDICATE_SYNONYMS.values()) == set(schema.PREDICATES)

# "A has B on his left": B is to the left of A, so subject and object swap roles.
_POSSESSIVES = ("his", "her", "its", "their")
_INVERTED = {f"{prep} {pos} {side}": f"to the {side} of"
             for prep in ("on", "to", "at") for pos in _POSSESSIVES
             for side in ("left", "right")}

_PHRASES = {**PREDICATE_SYNONYMS, **_INVERTED}
_BY_LENGTH = sorted(((tuple(k.split()), v, k in _INVERTED) for k, v in _PHRASES.items()),
                    key=lambda item: -len(item[0]))

_FILLERS = frozenset(
    "a an the this that these those some there here is are was were it its his her their "
    "my our your one two three four five several many few both another other each".split())
_COPULAS = frozenset("is are was were be been being am 's".split())
_VERBS = _COPULAS | frozenset(
    "has have had stands stand sits sit lies lie hangs hang rests rest appears appear seems "
    "seem shown seen located placed positioned situated set parked kept stacked mounted "
    "attached covered filled surrounded held worn displayed painted stuck lying laying "
    "can could will would may might does do did sleeps slept flew walks walked runs ran "
    "swims swam grows grew hung sat stood lay leans leaned rested plays played waits waited "
    "floats floated jumps jumped moves moved goes went comes came looks looked stays stayed "
    "remains remained drives drove rides rode flies".split())
# -ing words that are nouns, not verbs ("the painting on the wall").
_ING_NOUNS = frozenset(
    "building buildings ceiling painting paintings clothing railing railings awning string "
    "king wing wings ring rings thing things something nothing everything evening morning "
    "swing spring icing frosting stuffing topping toppings filling pudding wedding bedding "
    "siding landing dining sling lettering writing drawing drawings opening crossing parking "
    "serving dressing lighting housing stocking stockings earring earrings "
    "piping sibling siblings dumpling dumplings duckling ducklings".split())
# Words that end a noun phrase (clause or modifier starts).
_STOPS = frozenset(
    "with and or but while who which that where when whose as than from of for to at if "
    "so because then also".split())
_PUNCT = frozenset(".,;:!?")
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[.,;:!?]")

# Adjectives that become attribute nodes in text scene graphs.
ADJECTIVES = frozenset(
    "red orange yellow green blue purple pink brown black white gray grey silver gold golden "
    "beige tan dark light bright colorful colourful striped wooden metal plastic glass "
    "big small large little tiny huge giant tall short long wide narrow old young new "
    "round square empty full open closed wet dry clean dirty".split())


def tokenize(text: str) -> list[str]:
  """Lowercased word and punctuation tokens."""
  return _TOKEN.findall(text.lower())


def _is_verb(token: str) -> bool:
  return token in _VERBS or (
      token.endswith("ing") and len(token) > 4 and token not in _ING_NOUNS)


def _find_phrases(tokens: Sequence[str]) -> list[tuple[int, int, str, bool]]:
  """Non-overlapping predicate phrases, left to right, longest match first."""
  found, i = [], 0
  while i < len(tokens):
    for words, pred, inverted in _BY_LENGTH:
      if tuple(tokens[i:i + len(words)]) == words:
        found.append((i, i + len(words), pred, inverted))
        i += len(words)
        break
    else:
      i += 1
  return found


def _match_positions(tokens: Sequence[str], phrase: str) -> list[tuple[int, int]]:
  """Where `phrase` occurs as whole words, tolerating a plural 's'/'es' on any word."""
  words = tokenize(phrase)
  if not words:
    return []
  spans = []
  for i in range(len(tokens) - len(words) + 1):
    if all(t in (w, w + "s", w + "es") for t, w in zip(tokens[i:i + len(words)], words)):
      spans.append((i, i + len(words)))
  return spans


def _hint_in(tokens, lo, hi, hints, last):
  """The hint occurring in tokens[lo:hi] (the last or first occurrence), or None."""
  best = None
  for hint in hints:
    for a, b in _match_positions(tokens, hint):
      if lo <= a and b <= hi:
        key = a if last else -a
        if best is None or key > best[0] or (key == best[0] and b - a > best[2]):
          best = (key, hint, b - a)
  return None if best is None else best[1]


def _clean_np(words: Sequence[str]) -> str:
  """Drops leading determiners/fillers; returns the remaining words joined."""
  words = list(words)
  while words and (words[0] in _FILLERS or words[0] in _COPULAS):
    words.pop(0)
  return " ".join(words)


def _subject_np(tokens, lo, hi) -> str:
  """The noun phrase at the start of tokens[lo:hi], cut before verbs/modifiers."""
  words = []
  for i in range(lo, hi):
    t = tokens[i]
    if t in _PUNCT:
      words = []  # a new clause starts after punctuation
      continue
    if words and (_is_verb(t) or t in _STOPS or any(
        tuple(tokens[i:i + len(w)]) == w for w, _, _ in _BY_LENGTH)):
      break
    if not words and (t in _FILLERS or _is_verb(t)):
      continue
    words.append(t)
  return _clean_np(words)


def _object_np(tokens, lo) -> tuple[str, int]:
  """The noun phrase starting at tokens[lo] and the index just past it.

  It ends at punctuation, a clause word, a verb or another relation phrase.
  """
  i = lo
  while i < len(tokens):
    t = tokens[i]
    if t in _PUNCT or t in _STOPS or _is_verb(t):
      break
    if i > lo and any(tuple(tokens[i:i + len(w)]) == w for w, _, _ in _BY_LENGTH):
      break
    i += 1
  return _clean_np(tokens[lo:i]), i


def _main_verb(tokens) -> Optional[int]:
  for i, t in enumerate(tokens):
    if t in _VERBS or (i > 0 and _is_verb(t)):
      return i
  return None


def extract_triples(caption: str, *, subjects: Sequence[str] = (),
                    objects: Sequence[str] = ()) -> list[Triple]:
  """Parses spatial (subject, predicate, object) triples from a caption.

  Args:
    caption: free text, any case.
    subjects: phrases likely to be subjects (e.g. the annotated `s` strings); used for the
      subject when they occur before the relation, and to pick the relation.
    objects: phrases likely to be objects (the annotated `o` strings), likewise after it.

  Returns:
    Triples with predicates from `schema.PREDICATES`, the main relation first; empty if no
    relation phrase with a noun phrase on both sides is found. Phrases are lowercased and
    stripped of leading determiners; a hint phrase is returned verbatim when it is used.
  """
  tokens = tokenize(caption)
  cands = _find_phrases(tokens)
  if not cands:
    return []
  verb = _main_verb(tokens)
  hints = tuple(subjects) + tuple(objects)

  def score(c):
    start, end, _, inverted = c
    s = 0
    before = _hint_in(tokens, 0, start, subjects, last=True)
    after = _hint_in(tokens, end, len(tokens), objects, last=False)
    if inverted:
      # "o has s on his left": the hints swap sides.
      before = _hint_in(tokens, 0, start, objects, last=True)
      after = _hint_in(tokens, 0, start, subjects, last=True)
    s += 4 * (before is not None and after is not None)
    s += 2 * (verb is not None and start > verb)
    s += 1 * bool(inverted or _object_np(tokens, end)[0])
    return s

  order = sorted(range(len(cands)), key=lambda k: (-score(cands[k]), k))
  best = order[0]
  triples = []
  start, end, pred, inverted = cands[best]
  if inverted:
    subj_hint = _hint_in(tokens, verb if verb is not None else 0, start, hints, last=True)
    subj = subj_hint or _subject_np(tokens, verb + 1 if verb is not None else 0, start)
    obj_hint = _hint_in(tokens, 0, verb if verb is not None else start, hints, last=False)
    obj = obj_hint or _subject_np(tokens, 0, verb if verb is not None else start)
    obj_end = -1  # nothing chains onto "... on his left"
  else:
    subj = (_hint_in(tokens, 0, start, subjects, last=True)
            or _hint_in(tokens, 0, start, hints, last=True) or _subject_np(tokens, 0, start))
    obj_np, obj_end = _object_np(tokens, end)
    # A hint may run past the plain noun phrase ("glass of water").
    obj = (_hint_in(tokens, end, len(tokens), objects, last=False)
           or _hint_in(tokens, end, obj_end, hints, last=False) or obj_np)
  if subj and obj:
    triples.append((subj, pred, obj))
    # Relations chained after the main one ("a cup on a table next to a lamp") take the
    # previous object as their subject.
    prev_obj, prev_end = obj, obj_end
    for c_start, c_end, c_pred, c_inv in cands[best + 1:]:
      if c_inv or c_start != prev_end:
        break
      nxt_np, nxt_end = _object_np(tokens, c_end)
      nxt = _hint_in(tokens, c_end, nxt_end, hints, last=False) or nxt_np
      if not nxt:
        break
      triples.append((prev_obj, c_pred, nxt))
      prev_obj, prev_end = nxt, nxt_end
  return triples


def split_adjectives(phrase: str) -> tuple[str, tuple[str, ...]]:
  """Splits known adjectives (`ADJECTIVES`) off a noun phrase: ("man", ("old",))."""
  words = tokenize(phrase)
  adjs = tuple(w for w in words[:-1] if w in ADJECTIVES)
  rest = [w for i, w in enumerate(words) if i == len(words) - 1 or w not in ADJECTIVES]
  return " ".join(rest), adjs


def adjectives_before(caption: str, phrase: str) -> tuple[str, ...]:
  """Known adjectives right before the first mention of `phrase` ("the tall blue wall")."""
  tokens = tokenize(caption)
  spans = _match_positions(tokens, phrase)
  if not spans:
    return ()
  i = spans[0][0]
  adjs = []
  while i > 0 and tokens[i - 1] in ADJECTIVES:
    i -= 1
    adjs.append(tokens[i])
  return tuple(reversed(adjs))


def predicate_agreement(records: Sequence[dict]) -> tuple[int, int]:
  """(hits, captions): how often the parsed main predicate equals the record's first
  annotated `p`, over every caption of VSD-format JSON records (annotated phrases as
  hints)."""
  hits = total = 0
  for record in records:
    triples = record["triple_list"]
    for caption in record["captions"]:
      got = extract_triples(caption, subjects=[t["s"] for t in triples],
                            objects=[t["o"] for t in triples])
      hits += bool(got) and got[0][1] == triples[0]["p"]
      total += 1
  return hits, total


if __name__ == "__main__":
  for _path in sys.argv[1:]:
    with open(_path, encoding="utf-8") as _f:
      _hits, _total = predicate_agreement(json.load(_f))
    print(f"{_path}: parsed predicate == annotated p for {_hits}/{_total} captions "
          f"({100 * _hits / max(_total, 1):.1f}%)")
