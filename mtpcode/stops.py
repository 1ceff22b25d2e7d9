"""Code-aware stop conditions (the ``StopCondition`` protocol of mtpcode.generation).

Each condition sees the whole generated text and returns where to cut it. They
are used by ``mtpcode complete`` (``--lines``, ``--block``, ``--cursor``), by
``mtpcode serve`` and by the REPL.

Where they cut, precisely (docs/cli.md promises these):

* :class:`LineLimit` (``--lines N``): after the N-th non-blank line of the
  completion; the newline ending that line is not part of the output. Blank
  lines are not counted, so after ``def f():`` with the cursor at the end of
  the line, ``--lines 1`` gives ``"\\n    <first body line>"``.
* :class:`BlockEnd` (``--block``): before the first completed line whose
  indentation leaves the block the cursor is in, with trailing whitespace
  removed. The block is the body being opened when the prompt's last non-blank
  line ends with ``:``, ``{``, ``(``, ``[`` or ``=>`` (lines must be indented
  deeper than it), else the block of that last line (lines must be indented at
  least as deep). A closing ``}`` at the opener's level ends the block too.
* :class:`SuffixReached` (``--cursor`` / ``suffix``): before the first
  completion line that equals (ignoring surrounding whitespace) the first
  non-blank line of the text after the cursor, with trailing whitespace
  removed. When the cursor is inside a line that has text after it, the
  completion instead ends at the end of that line, without the text that is
  already there.
"""

from __future__ import annotations

from collections.abc import Sequence

TAB_WIDTH = 8
_OPENERS = (":", "{", "(", "[", "=>", "->", "do", "then")


def _indent(line: str) -> int:
    """Width of the leading whitespace of ``line`` (tabs to multiples of 8)."""
    width = 0
    for ch in line:
        if ch == " ":
            width += 1
        elif ch == "\t":
            width += TAB_WIDTH - width % TAB_WIDTH
        elif ch in "\r\f\v":
            continue
        else:
            break
    return width


def _trailing_space(text: str) -> int:
    return len(text) - len(text.rstrip())


def _line_starts(text: str, at_line_start: bool) -> list[int]:
    """Offsets in ``text`` where a new line begins (0 only if ``at_line_start``)."""
    starts = [0] if at_line_start else []
    pos = text.find("\n")
    while pos >= 0:
        starts.append(pos + 1)
        pos = text.find("\n", pos + 1)
    return starts


class LineLimit:
    """Stop after ``n`` non-blank lines of output (the newline ending the last is dropped)."""

    reason = "lines"

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError("LineLimit needs n >= 1")
        self.n = n

    def check(self, text: str) -> int | None:
        count = 0
        start = 0
        while True:
            end = text.find("\n", start)
            if end < 0:
                return None
            if text[start:end].strip():
                count += 1
                if count == self.n:
                    return end
            start = end + 1

    def holdback(self, text: str) -> int:
        return 0


class BlockEnd:
    """Stop when a line dedents out of the block the cursor is in (completes one body).

    ``prompt`` is the text before the cursor: the block and whether the
    completion starts on a fresh line are read from it.
    """

    reason = "block"

    def __init__(self, prompt: str) -> None:
        self.at_line_start = prompt == "" or prompt.endswith("\n")
        lines = prompt.split("\n")
        # The cursor's own line counts when it has text; else the last non-blank line before it.
        last = next((ln for ln in reversed(lines) if ln.strip()), "")
        self.base = _indent(last)
        stripped = last.split("#")[0].rstrip() if "#" in last and not last.lstrip().startswith("#") else last.rstrip()
        self.opens = stripped.endswith(_OPENERS)
        # Lines indented less than this leave the block.
        self.min_indent = self.base + 1 if self.opens else self.base

    def _leaves(self, line: str) -> bool:
        return bool(line.strip()) and _indent(line) < self.min_indent

    def check(self, text: str) -> int | None:
        # An unfinished line counts as soon as it has text: its indentation is known.
        for start in _line_starts(text, self.at_line_start):
            end = text.find("\n", start)
            if self._leaves(text[start:] if end < 0 else text[start:end]):
                return len(text[:start].rstrip())
        return None

    def holdback(self, text: str) -> int:
        # A cut drops the whitespace before the line that leaves the block, so
        # while the last line is still blank, hold back from the end of the
        # previous line's text.
        starts = _line_starts(text, self.at_line_start)
        if starts and not text[starts[-1]:].strip():
            return len(text) - len(text[: starts[-1]].rstrip())
        return _trailing_space(text)


class SuffixReached:
    """Stop where the completion reaches the text after the cursor.

    ``prompt`` is the text before the cursor, ``suffix`` the text after it.
    """

    reason = "suffix"

    def __init__(self, prompt: str, suffix: str) -> None:
        self.at_line_start = prompt == "" or prompt.endswith("\n")
        rest_of_line = suffix.partition("\n")[0]
        self.rest_of_line = rest_of_line.strip()
        self.target = next((ln.strip() for ln in suffix.split("\n") if ln.strip()), "")

    def check(self, text: str) -> int | None:
        if self.rest_of_line and not self.at_line_start:
            # Filling in the middle of a line: end with that line.
            end = text.find("\n")
            if end < 0:
                return None
            line = text[:end].rstrip()
            if line.endswith(self.rest_of_line):
                line = line[: len(line) - len(self.rest_of_line)]
            return len(line)
        if not self.target:
            return None
        for start in _line_starts(text, self.at_line_start):
            end = text.find("\n", start)
            if end < 0:
                return None
            if text[start:end].strip() == self.target:
                return len(text[:start].rstrip())
        return None

    def holdback(self, text: str) -> int:
        if self.rest_of_line and not self.at_line_start:
            # The end of the line may repeat the text already after the cursor.
            best = _trailing_space(text)
            line = text.rstrip()
            for n in range(min(len(self.rest_of_line), len(line)), 0, -1):
                if line.endswith(self.rest_of_line[:n]):
                    return len(text) - len(line) + n
            return best
        if not self.target:
            return 0
        starts = _line_starts(text, self.at_line_start)
        last = starts[-1] if starts else None
        if last is not None and text.find("\n", last) < 0:
            partial = text[last:].strip()
            if self.target.startswith(partial):
                return len(text) - last + _trailing_space(text[:last])
        return _trailing_space(text)


def code_stops(
    prompt: str,
    *,
    suffix: str | None = None,
    lines: int | None = None,
    block: bool = False,
) -> list:
    """The stop conditions for a completion at the end of ``prompt`` (before ``suffix``)."""
    stops: list = []
    if suffix is not None and suffix.strip():
        stops.append(SuffixReached(prompt, suffix))
    if lines:
        stops.append(LineLimit(lines))
    if block:
        stops.append(BlockEnd(prompt))
    return stops


def apply_stops(text: str, stops: Sequence) -> tuple[str, str | None]:
    """Cut a finished ``text`` with ``stops`` as a generation would: (text, reason or None)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        cut = stop.check(text)
        if cut is not None and (best is None or cut < best[0]):
            best = (cut, stop.reason)
    return (text, None) if best is None else (text[: best[0]], best[1])
