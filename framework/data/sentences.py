"""A small rule-based sentence splitter (offline: no nltk, no punkt data).

`split_sentences(text)` cuts after `.`, `!` or `?` (and any closing quotes or brackets right
after it) when whitespace follows and the next word starts with a capital letter, a digit or an
opening quote/bracket. It does not cut

* after common abbreviations: titles (`Dr.`, `Mr.`, `Prof.`, ...), `e.g.`, `i.e.`, `etc.`,
  `vs.`, `cf.`, `No.`, month and weekday abbreviations, ...;
* after initialisms written with dots (`U.S.`, `U.K.`, `J. R. R. Tolkien`): a single letter
  followed by a dot is never a sentence end;
* inside numbers (`3.14`, `1,000.5`): no whitespace follows the dot.

Newlines are whitespace like any other; a blank line (paragraph break) always ends a sentence.
Leading and trailing whitespace of each sentence is stripped and empty sentences are dropped, so
`" ".join(split_sentences(t))` gives back `t` up to whitespace.
"""
from __future__ import annotations

import re
from typing import List

# Lower-cased, without the final dot. Multi-dot forms ("e.g", "i.e", "u.s") are matched on the
# whole token before the final dot.
ABBREVIATIONS = frozenset("""
mr mrs ms dr prof sr jr st mt rev gen col lt sgt capt cmdr adm gov sen rep pres supt hon
fr messrs mmes esq
e.g i.e etc vs v cf al ca approx dept est fig figs no nos vol vols p pp ed eds op cit ibid
inc ltd co corp bros assn univ
jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thur thurs fri sat sun
a.m p.m u.s u.k u.n e.u a.d b.c ph.d m.d b.a m.a d.c
""".split())

_CLOSERS = "\"')]}\u201d\u2019\u00bb"
_OPENERS = "\"'([{\u201c\u2018\u00ab"
# a candidate end: terminal punctuation, optional closers, then whitespace
_END = re.compile(r"[.!?]+[" + re.escape(_CLOSERS) + r"]*(?=\s)")
_PARAGRAPH = re.compile(r"\n[ \t]*\n")


def _previous_token(text: str, dot: int) -> str:
    """The word right before position `dot` (where the terminal punctuation starts)."""
    start = dot
    while start > 0 and not text[start - 1].isspace() and text[start - 1] not in _OPENERS:
        start -= 1
    return text[start:dot]


def _is_boundary(text: str, match: re.Match) -> bool:
    punct = match.group(0)
    rest = text[match.end():].lstrip()
    if not rest:
        return True
    first = rest[0]
    if not (first.isupper() or first.isdigit() or first in _OPENERS):
        return False
    if punct[0] != "." or punct.startswith(".."):
        return True  # "!", "?", or an ellipsis followed by a capital
    token = _previous_token(text, match.start())
    word = token.lower()
    if word in ABBREVIATIONS:
        return False
    if len(token) == 1 and token.isalpha():
        return False  # an initial: "J. Smith", the last letter of "U.S."
    if re.fullmatch(r"(?:[A-Za-z]\.)+[A-Za-z]", token):
        return False  # a dotted initialism not in the list: "N.A.S.A."
    return True


def _split_paragraph(text: str) -> List[str]:
    out, start = [], 0
    for match in _END.finditer(text):
        if _is_boundary(text, match):
            out.append(text[start:match.end()])
            start = match.end()
    out.append(text[start:])
    return out


def split_sentences(text: str) -> List[str]:
    """The sentences of `text`, stripped, empty ones dropped (see the module docstring)."""
    sentences: List[str] = []
    for paragraph in _PARAGRAPH.split(text):
        sentences.extend(s.strip() for s in _split_paragraph(paragraph))
    return [s for s in sentences if s]
