"""Where generated text ends: every stop condition, and the reasons a generation stops.

A stop condition sees the whole text generated so far. ``check`` returns
the length at which the output must be cut (the generation then stops) or
None to go on; ``holdback`` returns how many trailing characters must not be
shown yet because they may turn out to be the start of a stop (a partial
stop string, a line that may leave the block). ``reason`` names the stop in
``Done.stop_reason``.

The engine applies :class:`StopStrings` (``GenerationOptions.stop``) and
:class:`RepeatStop` (``GenerationOptions.repeat_stop``) itself; the front ends
add the others.

Where the code-aware ones cut, precisely (docs/cli.md promises these):

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
* :class:`RepeatStop` (on by default in every front end, ``--no-repeat-stop``):
  a degenerate loop, cut where it is recognised: at a repeated line's end, or
  within the line for a short unit running along it (see the class for the
  thresholds).

Editor requests (llama.cpp server's fields) add :class:`WordStop` (``stop``),
:class:`IndentLimit` (``n_indent``) and :class:`TimeLimit`
(``t_max_predict_ms``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Protocol


class StopReason(str, Enum):
    """Why a generation ended (``Done.stop_reason``); compares equal to its value."""

    EOS = "eos"  # the model's end-of-generation token
    MAX_TOKENS = "max_tokens"
    CONTEXT = "context"  # the context is full
    INTERRUPTED = "interrupted"  # the caller's cancel event (Ctrl-C, a newer keystroke)
    CANCELLED = "cancelled"  # a server's request that ended before it ran, or was cancelled
    STOP = "stop"  # a stop string
    WORD = "word"  # a stop string of an editor request (llama-server's "word")
    LINES = "lines"
    BLOCK = "block"
    SUFFIX = "suffix"
    LIMIT = "limit"  # llama-server's n_indent and t_max_predict_ms
    REPEAT = "repeat"  # a degenerate loop

    def __str__(self) -> str:
        return self.value


class StopCondition(Protocol):
    """Decides where generated text ends (see the module docstring)."""

    reason: StopReason

    def check(self, text: str) -> int | None: ...

    def holdback(self, text: str) -> int: ...


# ---------------------------------------------------------------------------
# strings


class StopStrings:
    """Stop at the first occurrence of any of ``strings``, which is not output."""

    reason = StopReason.STOP

    def __init__(self, strings: Sequence[str]) -> None:
        self.strings = tuple(s for s in strings if s)

    def check(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return min(hits) if hits else None

    def holdback(self, text: str) -> int:
        # Longest suffix of text that is a proper prefix of some stop string.
        best = 0
        for s in self.strings:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


class WordStop(StopStrings):
    """The request's ``stop`` strings, remembering which one ended the completion
    (llama-server's ``stopping_word``)."""

    reason = StopReason.WORD

    def __init__(self, strings: Sequence[str]) -> None:
        super().__init__(strings)
        self.matched = ""

    def check(self, text: str) -> int | None:
        hits = [(i, s) for s in self.strings if (i := text.find(s)) >= 0]
        if not hits:
            return None
        at, self.matched = min(hits)
        return at


# ---------------------------------------------------------------------------
# lines and blocks

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

    reason = StopReason.LINES

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

    reason = StopReason.BLOCK

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

    reason = StopReason.SUFFIX

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


def code_stops(prompt: str, *, suffix: str | None = None, lines: int | None = None,
               block: bool = False) -> list[StopCondition]:
    """The stop conditions for a completion at the end of ``prompt`` (before ``suffix``)."""
    stops: list[StopCondition] = []
    if suffix is not None and suffix.strip():
        stops.append(SuffixReached(prompt, suffix))
    if lines:
        stops.append(LineLimit(lines))
    if block:
        stops.append(BlockEnd(prompt))
    return stops


# ---------------------------------------------------------------------------
# editor requests (llama.cpp server's fields)


class IndentLimit:
    """llama.cpp's ``n_indent``: stop before a new line indented less than ``n`` columns.

    Only lines the completion starts count (not the rest of the cursor's line);
    a line is judged once it has text; the newline before it is not output.
    """

    reason = StopReason.LIMIT

    def __init__(self, n: int) -> None:
        self.n = n

    def check(self, text: str) -> int | None:
        for start in _line_starts(text, at_line_start=False):
            i = start
            while i < len(text) and text[i] in " \t":
                i += 1
            if i < len(text) and text[i] not in "\r\n" and i - start < self.n:
                return max(0, start - 1)
        return None

    def holdback(self, text: str) -> int:
        # A newline followed by only blanks may turn out to start a line that ends the completion.
        nl = text.rfind("\n")
        if nl >= 0 and not text[nl + 1:].strip(" \t"):
            return len(text) - nl
        return 0


class TimeLimit:
    """llama.cpp's ``t_max_predict_ms``: once ``ms`` have passed since the first generated
    text, stop after the next newline (the newline is kept, as llama-server keeps it)."""

    reason = StopReason.LIMIT

    def __init__(self, ms: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit_s = ms / 1000.0
        self.clock = clock
        self.started: float | None = None
        self.seen = 0

    def check(self, text: str) -> int | None:
        now = self.clock()
        if self.started is None:
            self.started = now
        new_from, self.seen = self.seen, len(text)
        if now - self.started <= self.limit_s:
            return None
        nl = text.find("\n", new_from)
        return None if nl < 0 else nl + 1

    def holdback(self, text: str) -> int:
        return 0


# ---------------------------------------------------------------------------
# degenerate loops

# One line (exactly, trailing whitespace aside) this many times in a row is a loop. Real code
# repeats a line a few times (closing brackets at one level, `pass`, a small zero table).
SAME_LINE_REPEATS = 8
# A group of 2..MAX_CYCLE_LINES lines repeated this many times in a row is a loop: a function
# or a test case copied verbatim four times over is not code anyone writes.
CYCLE_REPEATS = 4
MAX_CYCLE_LINES = 8
# Within a line: a unit of at most MAX_UNIT characters repeated over this many characters, and
# at least UNIT_REPEATS times. Separator comments (`# ----...`, `/* ==== */`) run to 80-120
# characters of punctuation, and hex constants to 64 zeros (a 256-bit hash): both stay under
# the limits. 32 characters cover a nested call written over and over
# (`os.path.join(root, os.path.join(root, ...`, 19 characters a unit, seen from the built-in model).
MAX_UNIT = 32
UNIT_REPEATS = 8
RUN_WITH_WORDS = 96  # the unit has a letter or digit ("000...", "foo(foo(...")
RUN_OF_SYMBOLS = 200  # only punctuation or spaces


class RepeatStop:
    """Stop a degenerate loop: a line repeated :data:`SAME_LINE_REPEATS` times in a row, a group
    of lines repeated :data:`CYCLE_REPEATS` times, or a line that keeps repeating a short unit.

    Small models (and large ones at temperature 0) fall into such loops and
    would otherwise fill ``max_tokens`` with them; editor completion tools all
    guard against this. The output is cut where the loop is recognised: at the
    end of a repeated line, within the line for a unit running along it
    (nothing shown is taken back, so nothing is held back).
    Repetition with variation (table rows, calls with other arguments) is
    never cut. Incremental: each call looks only at what was added since the
    last one, so a long generation costs linear time.
    """

    reason = StopReason.REPEAT

    def __init__(self) -> None:
        self._reset("")

    def _reset(self, text: str) -> None:
        self._text = text[:0]
        self._lines: list[str] = []  # complete lines so far, trailing whitespace removed
        self._line_start = 0
        self._runs = [0] * (MAX_UNIT + 1)  # per unit length p: chars at the end with text[i] == text[i-p]
        self._cut: int | None = None

    def check(self, text: str) -> int | None:
        if not text.startswith(self._text):  # not a continuation of what was seen: start over
            self._reset(text)
        start = len(self._text)
        self._text = text
        if self._cut is not None:
            return self._cut
        for i in range(start, len(text)):
            ch = text[i]
            if ch == "\n":
                self._lines.append(text[self._line_start:i].rstrip())
                self._line_start = i + 1
                self._runs = [0] * (MAX_UNIT + 1)
                if self._lines_loop():
                    self._cut = i
                    return i
                continue
            line_pos = i - self._line_start
            runs = self._runs
            for p in range(1, min(MAX_UNIT, line_pos) + 1):
                runs[p] = runs[p] + 1 if text[i - p] == ch else 0
                span = runs[p] + p
                if span >= max(RUN_WITH_WORDS, UNIT_REPEATS * p) and self._run_too_long(text[i - p + 1: i + 1], span):
                    self._cut = i + 1
                    return i + 1
        return None

    @staticmethod
    def _run_too_long(unit: str, span: int) -> bool:
        words = any(ch.isalnum() for ch in unit)
        return span >= (RUN_WITH_WORDS if words else RUN_OF_SYMBOLS)

    def _lines_loop(self) -> bool:
        lines = self._lines
        n = len(lines)
        if n >= SAME_LINE_REPEATS and all(lines[-1] == lines[-1 - j] for j in range(1, SAME_LINE_REPEATS)):
            return True
        for period in range(2, MAX_CYCLE_LINES + 1):
            span = period * CYCLE_REPEATS
            if n < span:
                break
            if all(lines[n - 1 - j] == lines[n - 1 - j - period] for j in range(span - period)):
                return True
        return False

    def holdback(self, text: str) -> int:
        return 0
