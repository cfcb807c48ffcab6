"""Emotion tag lines: the one grammar, used by the reader, the training pairs, the checks and the tests.

A *tag line* is a line made only of ``name:score`` tokens separated by spaces or tabs:

- ``name``: a lower-case ASCII word, ``[a-z][a-z_]*``, at most 64 characters (`EMOTION_NAME`): emotion
  names reach file names and SQL, so nothing else is ever a tag;
- ``score``: an integer from 0 to 10 in ASCII digits, no sign, no leading zero (`TAG_SCORE`);
- one space may follow the colon (``frustration: 9``: language models often write it so);
- spaces, tabs and a trailing ``\\r`` around the tokens are allowed.

`TAG_TOKEN` and `TAG_LINE` are the definitions; `is_tag_line`, `parse_tag_line` and `parse_tags` apply
them. Any line of any observation may be a tag line (the memory server appends new observations after an
old tag line, and drops a repeated one, so a tag line is often not the last): each is parsed, removed from
the node's text, and for an emotion scored on several tag lines the later one wins.

Everything else is prose and stays in the text untouched: ``URL: https://...``, ``status:done``,
``10:30``, ``Year: 2023`` (capitalised), ``Time: 10:30``, ``localhost:8080``.

Near misses (`tag_line_problems`): a line shaped like tokens ``word:value`` that is not a tag line but
reads as one meant to be (one of its tokens is a valid tag, as in ``warmth:high joy:8``, or all its names
are lower-case words and one value looks like a score, as in ``warmth:11``, ``joy:-1``, ``calm:07`` or
``joy:7.5``). Such a line is *kept as prose* (its text is never dropped, and no tag is taken from it: a
line is either a tag line or text, never half of each) and each offending token is reported with its
reason, which the reader turns into a reject row so that the user can fix the line. Plain prose such as
``status:done``, ``Year: 2023`` or a URL produces no report.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

MIN_SCORE = 0
MAX_SCORE = 10
# `\Z`, not `$`: `$` also matches before a trailing newline, so "joy\n" would pass `.match`.
EMOTION_NAME = re.compile(r"^[a-z][a-z_]{0,63}\Z")
TAG_NAME = r"[a-z][a-z_]{0,63}"
TAG_SCORE = r"10|[0-9]"  # explicit ASCII: str.isdigit() and \d accept '²' or '٣'
TAG_TOKEN = re.compile(rf"(?P<name>{TAG_NAME}): ?(?P<score>{TAG_SCORE})(?![^ \t\r])")
_TOKEN_BODY = rf"{TAG_NAME}: ?(?:{TAG_SCORE})"
TAG_LINE = re.compile(rf"[ \t]*{_TOKEN_BODY}(?:[ \t]+{_TOKEN_BODY})*[ \t\r]*\Z")
# A loosely tag-shaped token (`anything:value`, the name may even be empty) and a line made only of them.
_LOOSE_TOKEN = re.compile(r"(?P<name>[^\s:]*): ?(?P<value>\S+)")
_LOOSE_LINE = re.compile(r"[ \t]*[^\s:]*: ?\S+(?:[ \t]+[^\s:]*: ?\S+)*[ \t\r]*\Z")
_SCORE_LIKE = re.compile(r"[+-]?[0-9]{1,2}(?:\.[0-9]*)?\Z")
_NAME_ONLY = re.compile(rf"{TAG_NAME}\Z")


@dataclass
class TagLine:
    """A parsed tag line: its tags (later tokens win over earlier ones for the same emotion).

    `bad` is kept for callers of the earlier API and is always empty: a line with a bad token is not a tag
    line (see `tag_line_problems`)."""

    tags: dict[str, int] = field(default_factory=dict)
    bad: list[tuple[str, str]] = field(default_factory=list)


def normalise_emotion(name: str) -> str | None:
    """Lower-case `name`; None unless it is a plain word (letters and underscores, `EMOTION_NAME`).
    For emotion names a user types in a config; a tag line's names must already be lower-case."""
    name = name.strip().lower()
    return name if EMOTION_NAME.match(name) else None


def is_tag_line(line: str) -> bool:
    """True if `line` (one line, no newline) is a tag line: only `name:score` tokens (`TAG_LINE`)."""
    return ":" in line and TAG_LINE.match(line) is not None


_is_tag_line = is_tag_line  # the earlier private name


def parse_tag_line(line: str) -> TagLine | None:
    """The tags of one tag line, or None if `line` is not a tag line (then it is prose).

    `parse_tag_line("warmth:9 joy: 8 warmth:3").tags == {"warmth": 3, "joy": 8}` (later wins)."""
    if not is_tag_line(line):
        return None
    return TagLine({m["name"]: int(m["score"]) for m in TAG_TOKEN.finditer(line)})


def tag_line_problems(line: str) -> list[tuple[str, str]]:
    """For a near-miss line (see the module docstring): each token that keeps it from being a tag line,
    with the reason. Empty for a tag line and for plain prose."""
    if ":" not in line or is_tag_line(line) or not _LOOSE_LINE.match(line):
        return []
    tokens = list(_LOOSE_TOKEN.finditer(line))
    valid = [TAG_TOKEN.fullmatch(t.group(0)) is not None for t in tokens]
    lower_names = all(_NAME_ONLY.match(t["name"]) for t in tokens)
    score_like = any(_SCORE_LIKE.match(t["value"]) for t in tokens)
    if not any(valid) and not (lower_names and score_like):
        return []
    return [(t.group(0), _token_problem(t["name"], t["value"])) for t, ok in zip(tokens, valid, strict=True)
            if not ok]


def _token_problem(name: str, value: str) -> str:
    if not name:
        return "missing emotion name"
    if not _NAME_ONLY.match(name):
        return f"emotion name {name[:64]!r} is not a lower-case ASCII word ([a-z][a-z_]*)"
    if re.fullmatch(r"[+-]?[0-9]+", value):
        number = int(value)
        if MIN_SCORE <= number <= MAX_SCORE:
            return f"score {value!r} must be written {number} (no sign, no leading zero)"
        return f"score {number} is outside {MIN_SCORE}..{MAX_SCORE}"
    return f"score {value[:64]!r} is not an integer {MIN_SCORE}..{MAX_SCORE}"


@dataclass
class SplitTags:
    """Observations split into text lines and tags (see `split_observations`)."""

    lines: list[str]  # every line that is not a tag line, in order
    tags: dict[str, int]  # merged over all tag lines, later wins
    tag_lines: int  # how many tag lines were removed
    problems: list[tuple[str, str]]  # near-miss tokens (their lines are in `lines`)


def split_observations(observations: Iterable[str]) -> SplitTags:
    """Split observations (each may hold several lines) into prose lines and tags. Lines end at "\\n"."""
    lines: list[str] = []
    tags: dict[str, int] = {}
    problems: list[tuple[str, str]] = []
    n_tag_lines = 0
    for observation in observations:
        for line in observation.split("\n"):
            parsed = parse_tag_line(line)
            if parsed is not None:
                tags.update(parsed.tags)
                n_tag_lines += 1
                continue
            lines.append(line)
            if ":" in line:
                problems.extend(tag_line_problems(line))
    return SplitTags(lines, tags, n_tag_lines, problems)


def split_tag_line(text: str) -> tuple[str, TagLine | None]:
    """(`text` without any of its tag lines, their merged tags or None if it had none).

    Kept from the earlier API, where only the last line could be a tag line; now every line can be."""
    split = split_observations([text.rstrip()])
    text_out = "\n".join(split.lines).rstrip()
    return text_out, (TagLine(split.tags) if split.tag_lines else None)


def parse_tags(text: str) -> dict[str, int]:
    """The emotion tags of a text: all its tag lines merged, later lines winning.

    `parse_tags("note\\nwarmth:9 love:8\\nlater note\\nwarmth:6")` is `{"warmth": 6, "love": 8}`;
    `parse_tags("URL: https://x.org\\nstatus:done")` is `{}`."""
    return split_observations([text]).tags
