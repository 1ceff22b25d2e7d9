"""The REPL driven through prompt-toolkit's pipe input, on a real tiny bundle.

Keys go in through ``create_pipe_input``; the screen comes out of a real
VT100 output writing into a string. The Engine is real; expected completions
are computed with the same Engine directly.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prompt_toolkit.data_structures import Size
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output.vt100 import Vt100_Output

from mtpcode.config import load_settings
from mtpcode.generation import Done, GenerationOptions, SamplingOptions
from mtpcode.repl.commands import COMMANDS
from mtpcode.repl.edit import enter_submits, lexer_by_name, newline_indent
from mtpcode.repl.suggest import showable
from mtpcode.repl.ui import Repl, StreamPrinter, visible
from mtpcode.stops import StopStrings, code_stops

ALT_ENTER = "\x1b\r"
UP = "\x1b[A"
CTRL_C = "\x03"
CTRL_D = "\x04"
CTRL_E = "\x05"
ALT_F = "\x1bf"


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    from mtpcode.runtime import Engine

    with Engine(tiny_bundle, n_ctx=2048, n_threads=2) as eng:
        yield eng


class Screen:
    """A real VT100 output into a string; ``text()`` is what a terminal log would show, minus escapes."""

    def __init__(self) -> None:
        self.buf = io.StringIO()
        size = Size(rows=50, columns=200)
        self.output = Vt100_Output(self.buf, lambda: size, term="xterm-256color", enable_cpr=False)

    def text(self) -> str:
        raw = self.buf.getvalue()
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw).replace("\r\n", "\n")


def greedy(engine, prompt: str, max_tokens: int, stops=()) -> str:
    options = GenerationOptions(max_tokens=max_tokens, sampling=SamplingOptions(temperature=0.0))
    events = list(engine.generate(prompt, options, stops=stops))
    assert isinstance(events[-1], Done)
    return events[-1].text


def make_repl(engine, inp, screen, *, settings=None, **kw) -> Repl:
    kw.setdefault("suggest", False)
    kw.setdefault("stop", None)
    return Repl(settings or load_settings(max_tokens=10), engine=engine, input=inp, output=screen.output, **kw)


def drive(engine, keys: str, **kw) -> tuple[Repl, str]:
    """Run a REPL on ``keys`` (typed all at once) until it quits; returns it and the screen text."""
    screen = Screen()
    with create_pipe_input() as inp:
        ui = make_repl(engine, inp, screen, **kw)
        inp.send_text(keys)
        ui.run()
    return ui, screen.text()


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# --- editing rules (no model) ---------------------------------------------------------


def test_enter_submits_complete_input_and_opens_lines_in_blocks():
    py = lexer_by_name("python")
    cases = {
        "import os": True,
        "": True,  # an empty input continues the buffer
        "def f(x):": False,  # block opener
        "x = foo(1,": False,  # open bracket
        's = """doc': False,  # open multi-line string
        "s = '(' + x": True,  # brackets inside strings do not count
        "def f(x):\n    return x": False,  # inside a block with text on the last line
        "def f(x):\n    return x\n": True,  # an empty last line submits the block
        "def f(x):\n    ": True,  # ... also when it only holds the indentation
        "/help": True,
    }
    for text, submits in cases.items():
        assert enter_submits(text, len(text), py) is submits, text
    assert enter_submits("import os", 3, py) is False  # cursor inside the text: new line
    c = lexer_by_name("c")
    assert enter_submits("int main() {", 12, c) is False
    assert enter_submits("// comment {", 12, c) is True  # a comment, not a command, no open bracket


def test_new_lines_are_indented_by_the_code_before_them():
    py = lexer_by_name("python")
    assert newline_indent("def f(x):", py) == "    "
    assert newline_indent("    if x:", py) == "        "
    assert newline_indent("    y = g(", py) == "        "
    assert newline_indent("        return y", py) == "    "
    assert newline_indent("    y = 1", py) == "    "
    assert newline_indent("\tif x:", py) == "\t\t"


def test_stream_printer_prints_exactly_the_fed_text_with_context_colours():
    from pygments.token import String

    lexer = lexer_by_name("python")
    written: list[tuple] = []
    printer = StreamPrinter(lexer, 'x = """\n', written.extend)
    for chunk in ["abc ", "def", "\n", 'ghi"""\n', "import os\n"]:
        printer.feed(chunk)
    printer.finish()
    assert "".join(v for _, v in written) == 'abc def\nghi"""\nimport os\n'
    # "def" is inside the string opened in the context, so it is coloured as a string.
    assert all(t in String for t, v in written if "def" in v)


def test_visible_neutralises_terminal_controls():
    assert visible("a\x1b[2Jb\x0e\tc\r\n") == "a\u241b[2Jb\u240e\tc\n"


def test_not_a_terminal_says_so_and_exits_2(tiny_bundle):
    proc = subprocess.run(
        [sys.executable, "-m", "mtpcode", "repl", "--model", str(tiny_bundle)],
        input="", capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a tty" in lines[0] and "mtpcode complete" in lines[0]


# --- completions ------------------------------------------------------------------------


def test_submit_streams_the_greedy_continuation_and_it_joins_the_buffer(engine):
    first = "def fib(n):\n    "
    expected1 = greedy(engine, first, 10)
    expected2 = greedy(engine, first + expected1, 10)  # an empty submit continues the buffer
    # Enter after ':' opens an indented line; Enter on that (blank) line submits.
    ui, screen = drive(engine, "def fib(n):\r\r" + ALT_ENTER + "/quit\r")
    assert ui.text == first + expected1 + expected2
    assert ui.totals.completions == 2
    # The completion is on the screen (the part up to its first line break), then a stats line.
    head = visible(expected1).split("\n")[0]
    assert head.strip() and head in screen
    stats = [ln for ln in screen.splitlines() if ln.startswith("[") and "tok/s" in ln]
    assert len(stats) == 2 and all("tok/forward" in ln and "accept" in ln for ln in stats)
    assert stats[-1].endswith(f"· {ui.last_done.stop_reason}]")


def test_block_stop_ends_where_the_code_aware_stop_says(engine):
    prompt = "import os"
    expected = greedy(engine, prompt, 40, stops=code_stops(prompt, block=True))
    ui, _ = drive(engine, prompt + ALT_ENTER + "/quit\r", stop="block", settings=load_settings(max_tokens=40))
    assert ui.text == prompt + expected


def test_ctrl_c_during_a_completion_cancels_it_and_returns_to_the_prompt(engine):
    screen = Screen()
    with create_pipe_input() as inp:
        ui = make_repl(engine, inp, screen, settings=load_settings(max_tokens=1500))

        def interrupt() -> None:
            # Ctrl-C in a terminal: SIGINT to the process, while the completion streams.
            if ui.generating.wait(60):
                time.sleep(0.05)
                if ui.generating.is_set():
                    os.kill(os.getpid(), signal.SIGINT)

        thread = threading.Thread(target=interrupt, daemon=True)
        thread.start()
        inp.send_text("x = 1" + ALT_ENTER + "/stats\r/quit\r")
        started = time.monotonic()
        try:
            ui.run()
            thread.join(10)
        except KeyboardInterrupt:
            pytest.fail("the SIGINT escaped the REPL")
    elapsed = time.monotonic() - started
    done = ui.last_done
    assert done is not None and done.stop_reason == "interrupted"
    assert done.stats.generated_tokens < 1500
    # What was shown joined the buffer, and it is the start of the greedy continuation.
    shown = ui.text[len("x = 1"):]
    assert greedy(engine, "x = 1", len(engine.tokenize(shown, add_bos=False)) + 4).startswith(shown)
    text = screen.text()
    assert "· interrupted]" in text
    assert "(1 interrupted)" in text  # /stats ran afterwards: the REPL went on
    assert elapsed < 60


def test_ctrl_c_at_the_prompt_drops_the_input_and_ctrl_d_quits(engine):
    ui, _ = drive(engine, "half typed" + CTRL_C + CTRL_D)
    assert ui.text == "" and ui.totals.completions == 0


# --- commands ---------------------------------------------------------------------------


def test_every_command_does_what_help_says(engine, tiny_bundle, tmp_path):
    src = tmp_path / "prog.c"
    src.write_text("int main(void) {\n    return 0;\n}\n")
    saved = tmp_path / "out" / "saved.c"
    saved.parent.mkdir()
    keys = "".join(
        line + "\r"
        for line in [
            "/help",
            f"/load {src}",
            "/show",
            f"/save {saved}",
            f"/save {tmp_path / 'missing' / 'x.py'}",
            "/clear",
            "/undo",
            "/set temperature 0.5",
            "/set top_p 2",
            "/set stop 2 lines",
            "/set suggest off",
            "/set",
            f"/model {tiny_bundle}",
            "/stats",
            "/frobnicate",
            "/quit",
            "/help",  # never reached: /quit left
        ]
    )
    ui, screen = drive(engine, keys)
    helped = set(re.findall(r"^  /(\w+)", screen, re.M))
    assert helped == set(COMMANDS)
    assert screen.count("Commands:") == 1
    # /load read the file, picked the C lexer from the extension; /show printed it.
    assert "language = c" in screen
    assert screen.count("return 0;") >= 1
    # /save wrote the buffer (atomically: no temporary file left), and a bad path is an error line.
    assert saved.read_text() == src.read_text()
    assert sorted(p.name for p in saved.parent.iterdir()) == ["saved.c"]
    assert "error: cannot write" in screen
    # /clear emptied the buffer, /undo brought it back.
    assert "session buffer cleared" in screen and ui.text == src.read_text()
    # /set changed what it names and refused a bad value.
    assert ui.settings.temperature == 0.5 and ui.settings.top_p == 1.0
    assert "error: top_p must be" in screen
    assert ui.stop == 2 and ui.suggest_enabled is False
    assert "temperature = 0.5" in screen and "stop = 2 lines" in screen
    # /model loaded another Engine (owned by the REPL, closed at the end).
    assert ui.model_path == Path(tiny_bundle) and ui.engine is None
    assert "3 draft heads" in screen
    assert "session: 0 completions" in screen
    assert "error: unknown command /frobnicate" in screen


def test_history_persists_across_sessions(engine, tmp_path):
    history = tmp_path / "history"
    ui1, _ = drive(engine, "/set max_tokens 7\r/quit\r", history=history)
    assert ui1.settings.max_tokens == 7
    assert "/set max_tokens 7" in history.read_text()
    # A new session: Up twice recalls "/set max_tokens 7" (after "/quit"), Enter runs it.
    ui2, screen = drive(engine, UP + UP + "\r/quit\r", history=history)
    assert "max_tokens = 7" in screen and ui2.settings.max_tokens == 7


def test_a_long_session_slides_the_model_window(tiny_bundle, tmp_path):
    from mtpcode.runtime import Engine

    src = tmp_path / "long.py"
    src.write_text("".join(f"value_{i} = {i} * {i}\n" for i in range(60)))
    with Engine(tiny_bundle, n_ctx=128, n_threads=2) as small:
        ui, screen = drive(small, f"/load {src}\r" + ALT_ENTER + "/quit\r", settings=load_settings(max_tokens=8))
    assert "error" not in screen
    assert ui.totals.completions == 1 and ui.buffer.window_start > 0
    assert ui.text.startswith(src.read_text())


def test_loading_a_file_warms_the_engine_up_in_the_background(tiny_bundle, tmp_path):
    from mtpcode.runtime import Engine

    src = tmp_path / "long.py"
    src.write_text("".join(f"value_{i} = {i} * {i}\n" for i in range(60)))
    screen = Screen()
    with Engine(tiny_bundle, n_ctx=128, n_threads=2) as small, create_pipe_input() as inp:
        ui = make_repl(small, inp, screen, suggest=True, settings=load_settings(max_tokens=8))

        def typist() -> None:
            inp.send_text(f"/load {src}\r")
            # Without any key typed, the engine thread prefilled the buffer's tail that fits.
            wait_for(lambda: ui.buffer.window_start > 0 and small.cached_tokens, what="the warm-up")
            inp.send_text("/quit\r")

        thread = threading.Thread(target=typist, daemon=True)
        thread.start()
        ui.run()
        thread.join(5)
        cached = small.detokenize(small.cached_tokens)
    assert ui.text[ui.buffer.window_start :].startswith(cached.lstrip()[:20])
    assert ui.totals.completions == 0


# --- suggestions ------------------------------------------------------------------------


def _expected_suggestion(engine, typed: str, tokens: int) -> str:
    options = GenerationOptions(max_tokens=tokens, sampling=SamplingOptions(temperature=0.0))
    events = list(engine.generate(typed, options, stops=(StopStrings(["\n"]),)))
    return showable(events[-1].text)


def _typed_with_suggestion(engine, tokens: int) -> tuple[str, str]:
    for typed in ("x = ", "import o", "def f", "for i in ", "print(", "class A"):
        text = _expected_suggestion(engine, typed, tokens)
        if text.strip():
            return typed, text
    pytest.skip("the tiny model suggests only empty lines")


def test_suggestion_is_the_models_line_and_ctrl_e_accepts_it(engine):
    typed, expected = _typed_with_suggestion(engine, 6)
    screen = Screen()
    seen: list[str] = []
    with create_pipe_input() as inp:
        ui = make_repl(engine, inp, screen, suggest=True, suggest_tokens=6)
        buffer = ui.session.default_buffer

        def typist() -> None:
            for ch in typed:
                inp.send_text(ch)
                time.sleep(0.01)
            wait_for(lambda: buffer.suggestion is not None, what="a suggestion")
            seen.append(buffer.suggestion.text)
            # Alt-F takes one word of it; the rest stays suggested (from the cache, no model run).
            word = next(w for w in re.split(r"([^\s/]+(?:\s+|/))", seen[0]) if w)
            inp.send_text(ALT_F)
            wait_for(lambda: buffer.text == typed + word, what="one accepted word")
            wait_for(lambda: buffer.suggestion is not None or len(word) == len(seen[0]), what="the rest")
            inp.send_text(CTRL_E)
            wait_for(lambda: buffer.text == typed + seen[0], what="the accepted suggestion")
            inp.send_text(CTRL_C + "/quit\r")

        thread = threading.Thread(target=typist, daemon=True)
        thread.start()
        ui.run()
        thread.join(5)
    assert seen == [expected]
    assert ui.suggester.stats.completed >= 1
    assert ui.suggester.stats.cache_hits >= 1 or len(expected.split()) <= 1


def test_typing_never_waits_for_the_model_and_stale_suggestions_are_dropped(engine):
    typed, expected = _typed_with_suggestion(engine, 6)
    screen = Screen()
    release = threading.Event()
    log: dict[str, object] = {}
    with create_pipe_input() as inp:
        ui = make_repl(engine, inp, screen, suggest=True, suggest_tokens=6)
        buffer = ui.session.default_buffer

        def typist() -> None:
            # Keep the engine's worker busy, as a slow model would.
            wait_for(lambda: ui.scheduler is not None, what="the model")
            busy = ui.scheduler
            threading.Thread(target=lambda: busy.call(lambda: release.wait(60)), daemon=True).start()
            inp.send_text(typed[0])
            wait_for(lambda: ui.suggester.busy, what="a suggestion request")
            t0 = time.monotonic()
            inp.send_text(typed[1:])
            wait_for(lambda: buffer.text == typed, timeout=5, what="the typed text")
            log["typing_s"] = time.monotonic() - t0
            log["suggestion_while_busy"] = buffer.suggestion
            release.set()
            wait_for(lambda: buffer.suggestion is not None, what="the suggestion for the final text")
            log["suggestion"] = buffer.suggestion.text
            inp.send_text(CTRL_C + "/quit\r")

        thread = threading.Thread(target=typist, daemon=True)
        thread.start()
        try:
            ui.run()
        finally:
            release.set()
        thread.join(5)
    assert log["typing_s"] < 2.0  # the keys went through while the model was busy
    assert log["suggestion_while_busy"] is None
    assert log["suggestion"] == expected  # for the final text, not for the first key
    assert ui.suggester.stats.dropped >= 1  # the request for the first key was never shown
