"""The REPL's session buffer on its own: text, undo, the model's window, prompts.

No terminal is involved; the window is fitted against a real Engine's context
and tokenizer (the tiny bundle with a 128-token context).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from mtpcode.config import load_settings
from mtpcode.generation import Done, Stats
from mtpcode.repl.session import (
    SessionBuffer,
    count_lines,
    describe_stop,
    join_input,
    parse_stop,
)
from mtpcode.stops import code_stops


def done(text: str, reason: str = "max_tokens", tokens: int = 3) -> Done:
    stats = Stats(generated_tokens=tokens, decode_s=0.5, main_forwards=2)
    return Done(text=text, stop_reason=reason, stats=stats)


@pytest.fixture(scope="module")
def small_engine(tiny_bundle):
    from mtpcode.runtime import Engine

    with Engine(tiny_bundle, n_ctx=128, n_threads=2) as eng:
        yield eng


def test_the_session_module_does_not_import_prompt_toolkit():
    code = "import sys, mtpcode.repl.session; print(sorted(m for m in sys.modules if m.startswith('prompt_toolkit')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_input_joins_on_a_new_line_and_lines_count_like_an_editor():
    assert join_input("", "x = 1") == "x = 1"
    assert join_input("x = 1", "y") == "x = 1\ny"
    assert join_input("x = 1\n", "y") == "x = 1\ny"
    assert join_input("x = 1", "") == "x = 1"
    assert [count_lines(t) for t in ("", "a", "a\n", "a\nb", "a\nb\n")] == [0, 1, 1, 2, 2]


def test_stop_modes_read_back_what_they_show():
    for text, mode in [("block", "block"), ("none", None), ("off", None), ("3", 3), ("2 lines", 2), ("line 1", 1)]:
        assert parse_stop(text) == mode
        assert parse_stop(describe_stop(mode)) == mode
    for bad in ("0", "two", "3 4", ""):
        with pytest.raises(ValueError):
            parse_stop(bad)


def test_replace_undo_and_commit_keep_an_undo_history_and_tell_listeners():
    buf = SessionBuffer(load_settings())
    events: list[str] = []
    buf.on_change(lambda: events.append(buf.text))
    buf.replace("a = 1\n")
    buf.commit(buf.joined("b ="), " 2\n", done(" 2\n"))
    assert buf.text == "a = 1\nb = 2\n" and buf.lines == 2
    assert events == ["a = 1\n", "a = 1\nb = 2\n"]
    buf.replace("")
    assert buf.text == ""
    assert buf.undo() and buf.text == "a = 1\nb = 2\n"
    assert buf.undo() and buf.text == "a = 1\n"  # the submission and its completion go together
    assert buf.undo() and buf.text == ""
    assert not buf.undo()


def test_commit_counts_completions_in_the_totals():
    buf = SessionBuffer(load_settings())
    buf.commit(buf.joined("x"), "1", done("1", tokens=4))
    buf.commit(buf.joined(""), "2", done("2", reason="interrupted", tokens=2))
    t = buf.totals
    assert (t.completions, t.generated_tokens, t.main_forwards, t.interrupted) == (2, 6, 4, 1)
    assert buf.last_done is not None and buf.last_done.stop_reason == "interrupted"


def test_prompts_skip_commands_and_empty_input():
    buf = SessionBuffer(load_settings())
    assert buf.prompt_for("") is None
    assert buf.prompt_for("/help") is None
    assert buf.prompt_for("x = ") == "x = "
    buf.replace("import os")
    assert buf.prompt_for("") == "import os"
    assert buf.prompt_for("// a C comment") == "import os\n// a C comment"


def test_options_follow_the_settings():
    buf = SessionBuffer(load_settings(max_tokens=9, temperature=0.7, heads=2), suggest_tokens=5)
    opts = buf.completion_options()
    assert (opts.max_tokens, opts.sampling.temperature, opts.heads) == (9, 0.7, 2)
    ghost = buf.suggestion_options()
    assert (ghost.max_tokens, ghost.sampling.temperature, ghost.heads) == (5, 0.0, 2)


def test_stops_follow_the_stop_mode():
    buf = SessionBuffer(load_settings(), stop="block")
    prompt = "def f(x):\n    return x\n"
    assert [type(s) for s in buf.stops(prompt)] == [type(s) for s in code_stops(prompt, block=True)]
    buf.stop = 2
    assert [type(s) for s in buf.stops(prompt)] == [type(s) for s in code_stops(prompt, lines=2)]
    buf.stop = None
    assert buf.stops(prompt) == []


def test_the_window_slides_to_a_line_start_that_fits_and_then_stays(small_engine):
    def count(text: str) -> int:
        return len(small_engine.tokenize(text))

    buf = SessionBuffer(load_settings(max_tokens=8), small_engine)
    moves: list[int] = []
    buf.on_change(lambda: moves.append(buf.window_start))
    short = "x = 1\n"
    buf.replace(short)
    assert buf.fit_window(short, count) == short and buf.window_start == 0
    long = "".join(f"value_{i} = {i} * {i}\n" for i in range(60))
    buf.replace(long)
    moves.clear()
    view = buf.fit_window(long, count)
    room = small_engine.n_ctx - 8
    assert buf.window_start > 0 and moves == [buf.window_start]
    assert long[buf.window_start - 1] == "\n" and view == long[buf.window_start :]
    assert count(view) <= room * 3 // 4
    # The line before the window start would not have fitted: the window is as large as it can be.
    previous = long.rfind("\n", 0, buf.window_start - 1) + 1
    assert count(long[previous:]) > room * 3 // 4
    # A little more text still fits: the window stays put, so the prompts share their prefix.
    start = buf.window_start
    more = buf.joined("extra = 1")
    assert buf.fit_window(more, count) == more[start:] and buf.window_start == start
    assert buf.prompt_for("extra = 1") == more[start:]
    # A new text starts a new window.
    buf.replace("y = 2\n")
    assert buf.window_start == 0
