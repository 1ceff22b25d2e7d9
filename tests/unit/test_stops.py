"""Code-aware stop conditions: where they cut, and that streaming never shows text a cut removes."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import pytest
from runtime_helpers import apply_stops

from mtpcode.stops import (
    CYCLE_REPEATS,
    RUN_WITH_WORDS,
    SAME_LINE_REPEATS,
    UNIT_REPEATS,
    BlockEnd,
    LineLimit,
    RepeatStop,
    StopStrings,
    SuffixReached,
    code_stops,
)


def stream(text: str, stops) -> tuple[str, str | None, str]:
    """Feed ``text`` one character at a time the way a generator does.

    Returns (final text, stop reason, text shown before the stop fired); the
    shown text must always be a prefix of the final text.
    """
    shown = ""
    for i in range(1, len(text) + 1):
        part = text[:i]
        cuts = [(s.check(part), s.reason) for s in stops]
        cuts = [c for c in cuts if c[0] is not None]
        if cuts:
            cut, reason = min(cuts)
            return part[:cut], reason, shown
        hold = max((s.holdback(part) for s in stops), default=0)
        visible = part[: len(part) - hold]
        assert visible.startswith(shown), (part, visible, shown)
        shown = visible
    return text, None, shown


@pytest.mark.parametrize(
    "n,text,expected",
    [
        (1, "x = 1\ny = 2\n", "x = 1"),
        (2, "x = 1\ny = 2\nz\n", "x = 1\ny = 2"),
        (1, "\n    return x\n\nfoo\n", "\n    return x"),  # blank lines are not counted
        (2, "a\n\n   \nb\nc\n", "a\n\n   \nb"),
        (3, "a\nb\n", "a\nb\n"),  # not reached
    ],
)
def test_line_limit(n: int, text: str, expected: str) -> None:
    assert apply_stops(text, [LineLimit(n)])[0] == expected
    assert stream(text, [LineLimit(n)])[0] == expected


@pytest.mark.parametrize(
    "prompt,text,expected",
    [
        # Cursor on a fresh line after an opener: complete that body.
        ("def f(x):\n", "    y = x\n    return y\n\ndef g():\n", "    y = x\n    return y"),
        # Cursor at the end of the opener line: the body starts after a newline.
        ("def f(x):", "\n    return x\nprint(f(1))\n", "\n    return x"),
        # Cursor inside a body (last line not an opener): stay at that level or deeper.
        ("def f(x):\n    y = 1\n", "    if y:\n        y += 1\n    return y\nclass A:\n",
         "    if y:\n        y += 1\n    return y"),
        # Nested opener: the inner body only.
        ("def f(x):\n    if x:\n", "        return 1\n    return 2\n", "        return 1"),
        # Braces: the closing brace at the opener's level ends the body.
        ("int f(void) {\n", "  int a = 1;\n  return a;\n}\n\nint g", "  int a = 1;\n  return a;"),
        # Blank lines inside the body are fine; trailing ones are dropped.
        ("def f():\n", "    a = 1\n\n    b = 2\n\n\nx = 3\n", "    a = 1\n\n    b = 2"),
        # Tabs count to the next multiple of 8.
        ("\tif x:\n", "\t\ty\n\t        z\n    w\n", "\t\ty\n\t        z"),
        # A comment after the colon still opens the block.
        ("for i in x:  # loop\n", "    pass\nend\n", "    pass"),
        # No dedent before the end: everything.
        ("def f():\n", "    return 1\n", "    return 1\n"),
    ],
)
def test_block_end(prompt: str, text: str, expected: str) -> None:
    assert apply_stops(text, [BlockEnd(prompt)])[0] == expected
    final, _, _ = stream(text, [BlockEnd(prompt)])
    assert final == expected


def test_block_end_fires_as_soon_as_the_dedented_line_has_text() -> None:
    stop = BlockEnd("def f():\n")
    assert stop.check("    return 1\n") is None
    assert stop.check("    return 1\n\n  ") is None
    assert stop.check("    return 1\n\nd") == len("    return 1")


@pytest.mark.parametrize(
    "prompt,suffix,text,expected",
    [
        # The completion reaches the suffix's first non-blank line.
        ("def f(x):\n", "\ndef g():\n    pass\n", "    return x\n\ndef g():\n    pass\n", "    return x"),
        ("a = 1\n", "   \n  print(a)\n", "b = 2\nprint(a)\nc\n", "b = 2"),
        # Mid-line cursor with text after it: finish the line, without that text.
        ("print(", ")\nx = 1\n", "a, b)\nmore\n", "a, b"),
        ("print(", ")\n", "a, b\nmore\n", "a, b"),
        # Cursor at the end of a line: the rest of the line is blank, use the next line.
        ("x = 1", "\ny = 2\n", "\nz = 3\ny = 2\n", "\nz = 3"),
        # Nothing after the cursor but blanks: no stop.
        ("x = 1\n", "\n\n", "y = 2\n", "y = 2\n"),
    ],
)
def test_suffix_reached(prompt: str, suffix: str, text: str, expected: str) -> None:
    stops = code_stops(prompt, suffix=suffix)
    assert apply_stops(text, stops)[0] == expected
    assert stream(text, stops)[0] == expected


def test_streaming_never_shows_text_that_is_cut_later() -> None:
    rng = random.Random(1234)
    alphabet = ["a", "b", " ", "  ", "\t", "\n", "\n    ", "}", ":", "x = 1", "\n\n", "def g():"]
    prompts = ["def f():\n", "    x = 1\n", "int f() {\n", "if x:", "print(", ""]
    for _trial in range(300):
        prompt = rng.choice(prompts)
        suffix = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4)))
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        stops = code_stops(prompt, suffix=suffix, lines=rng.choice([None, 1, 2, 3]), block=rng.random() < 0.5)
        stops.append(StopStrings(["x = 1\n", "def"]))
        final, reason, shown = stream(text, stops)
        assert final.startswith(shown)
        if reason is not None:
            expected, _ = apply_stops(text, stops)
            # The stream stops at the first prefix where any stop fires; apply_stops on
            # the whole text may find an earlier cut only by looking ahead, never a later one.
            assert len(expected) <= len(final)


def test_code_stops_selects() -> None:
    assert code_stops("x\n") == []
    kinds = [type(s) for s in code_stops("x\n", suffix="y\n", lines=2, block=True)]
    assert kinds == [SuffixReached, LineLimit, BlockEnd]
    assert code_stops("x\n", suffix="  \n") == []


# ---------------------------------------------------------------------------
# degenerate loops


def _loop_cut(text: str) -> int | None:
    """Where RepeatStop cuts ``text`` fed a few characters at a time, as a generation feeds it."""
    stop = RepeatStop()
    for end in range(3, len(text) + 3, 3):
        cut = stop.check(text[:end])
        if cut is not None:
            assert stop.holdback(text[:end]) == 0
            return cut
    return None


@pytest.mark.parametrize(
    "unit,repeats",
    [
        ("        self._loop = None\n", SAME_LINE_REPEATS),  # one line, over and over
        ("\n", SAME_LINE_REPEATS),  # blank lines
        ("def f():\n    pass\n\n", CYCLE_REPEATS),  # a group of lines
        ("a = 1\nb = 2\n", CYCLE_REPEATS),
    ],
)
def test_repeat_stop_cuts_a_loop_of_lines_where_it_is_recognised(unit: str, repeats: int) -> None:
    text = "x = compute()\n" + unit * (repeats + 3)
    cut = _loop_cut(text)
    assert cut == len("x = compute()\n" + unit * repeats) - 1  # the end of the line that made the count
    almost = "x = compute()\n" + unit * (repeats - 1)
    assert RepeatStop().check(almost) is None


@pytest.mark.parametrize("unit", ["0", "foo(", "ab", "the a list of ", "os.path.join(root, "])
def test_repeat_stop_cuts_a_short_unit_repeated_along_a_line(unit: str) -> None:
    head = '        """Return the a list of the 2'
    text = head + unit * 200
    cut = _loop_cut(text)
    limit = max(RUN_WITH_WORDS, UNIT_REPEATS * len(unit))
    assert cut is not None and limit <= cut - len(head) <= limit + 3 + len(unit)
    assert RepeatStop().check(head + unit * ((limit - 1) // len(unit) - 1)) is None


@pytest.mark.parametrize(
    "text",
    [
        "# " + "-" * 118 + "\n",  # a separator comment
        "/* " + "=" * 150 + " */\n",
        "ZERO_HASH = 0x" + "0" * 64 + "\n",  # a 256-bit constant
        "".join(f"    [{i}, {i * i}, {i ** 3}],\n" for i in range(40)),  # a table
        "".join(f"assert fib({i}) == {f}\n" for i, f in enumerate([0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89])),
        "".join(f"{'    ' * d}}}\n" for d in range(12, 0, -1)),  # closing braces at every level
        "    pass\n" * (SAME_LINE_REPEATS - 1),
        ("if x:\n    y()\n" * (CYCLE_REPEATS - 1)),
    ],
)
def test_repeat_stop_leaves_real_code_alone(text: str) -> None:
    assert _loop_cut(text) is None


def test_repeat_stop_leaves_the_standard_library_alone() -> None:
    """Real code, as much as a unit test can read: every fourth top-level module of the standard
    library, whole (over all of CPython 3.11's 1,790 files it fires in 11, each a test's data or a
    generated codec table: docs/cli.md)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))[::4]
    assert len(files) > 30
    for path in files:
        assert RepeatStop().check(path.read_text(encoding="utf-8")) is None, path.name
