"""End to end in a real terminal: `mtpcode repl` inside tmux, typed with
send-keys, read back with capture-pane.

Skipped when tmux is not installed (`apt-get install -y tmux`). Run alone with
``pytest tests/integration/test_repl_tmux.py -q``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from mtpcode.generation import GenerationOptions, SamplingOptions
from mtpcode.repl.suggest import showable
from mtpcode.repl.ui import visible
from mtpcode.stops import StopStrings

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install -y tmux)")

WIDTH, HEIGHT = 120, 40
REPO = Path(__file__).resolve().parents[2]


class Tmux:
    """One tmux server on a private socket, with one window running a command."""

    def __init__(self) -> None:
        self.socket = f"mtpcode-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def tmux(self, *args: str) -> str:
        proc = subprocess.run(
            ["tmux", "-L", self.socket, "-f", "/dev/null", *args], capture_output=True, text=True, timeout=30
        )
        if proc.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def start(self, argv: list[str], env: dict[str, str]) -> None:
        settings = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        # Keep the window after the REPL exits so its exit status can be read.
        command = f'env {settings} {shlex.join(argv)}; echo "[exit $?]"; sleep 600'
        self.tmux("new-session", "-d", "-s", "repl", "-x", str(WIDTH), "-y", str(HEIGHT), command)

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "repl", *keys)

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", "repl", "-l", text)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-t", "repl")

    def wait_for(self, predicate, timeout: float = 60.0, what: str = "") -> str:
        end = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if predicate(screen):
                return screen
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting for {what}; the screen:\n{screen}")
            time.sleep(0.1)

    def close(self) -> None:
        try:
            self.tmux("kill-server")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass


@pytest.fixture
def tmux():
    session = Tmux()
    yield session
    session.close()


def _greedy(bundle, prompt: str, max_tokens: int, line_only: bool = False) -> str:
    from mtpcode.runtime import Engine

    options = GenerationOptions(max_tokens=max_tokens, sampling=SamplingOptions(temperature=0.0))
    stops = (StopStrings(["\n"]),) if line_only else ()
    with Engine(bundle, n_threads=2) as engine:
        return list(engine.generate(prompt, options, stops=stops))[-1].text


def _repl_argv(bundle) -> list[str]:
    exe = shutil.which("mtpcode")
    base = [exe] if exe else [sys.executable, "-m", "mtpcode"]
    # (--no-repeat-stop: the long completion that Ctrl-C cuts must not end by itself first)
    return base + ["repl", "--model", str(bundle), "--threads", "2", "--stop", "none", "-n", "8", "--no-repeat-stop"]


def test_repl_in_a_real_terminal(tmux, tiny_bundle, tmp_path):
    expected = _greedy(tiny_bundle, "def fib(n):\n    ", 8)
    suggestion = ""
    for typed in ("x = ", "import o", "def f", "print("):
        suggestion = showable(_greedy(tiny_bundle, typed, 16, line_only=True))
        if suggestion.strip():
            break
    env = {"MTPCODE_HOME": str(tmp_path / "home"), "TERM": "xterm-256color", "PYTHONPATH": str(REPO)}
    tmux.start(_repl_argv(tiny_bundle), env)

    # The prompt and the bottom toolbar (drawn once the terminal reported the cursor position).
    screen = tmux.wait_for(lambda s: ">>>" in s and "Alt-Enter submit" in s, what="the prompt and toolbar")
    assert "tiny-f32 (3 heads)" in screen and "Enter submit/new line" in screen

    # Ghost text (on the empty session): the model's rest of the line appears after the
    # cursor; Ctrl-E accepts it, Ctrl-C drops the input again.
    if suggestion.strip():
        tmux.type(typed)
        tmux.wait_for(lambda s: f">>> {typed}{suggestion}" in s, what=f"the suggestion {suggestion!r}")
        tmux.keys("C-e")
        tmux.keys("C-c")  # drop the input

    # Enter after ':' opens an indented line; Alt-Enter (Esc Enter) submits.
    tmux.type("def fib(n):")
    tmux.keys("Enter")
    tmux.wait_for(lambda s: "... " in s, what="the continuation line")
    tmux.keys("Escape", "Enter")
    screen = tmux.wait_for(lambda s: "tok/forward" in s, what="the stats line")
    first_line = visible(expected).split("\n")[0]
    assert first_line.strip() and ("    " + first_line) in screen
    assert "· max_tokens]" in screen or "· eos]" in screen

    # Ctrl-C while a long completion streams cancels it and the REPL goes on. Sent as soon as
    # the text streams: the random tiny model can end its text with EOS a few hundred tokens in,
    # a third of a second at its ~1,000 tokens/s.
    tmux.type("/set max_tokens 3500")
    tmux.keys("Enter")
    tmux.wait_for(lambda s: "max_tokens = 3500" in s, what="/set")
    tmux.keys("Escape", "Enter")  # an empty submit continues the buffer

    echo = len("".join(first_line.split()))  # the buffer's last line, shown again with the prompt

    def streaming(screen: str) -> bool:
        after = screen.rsplit("max_tokens = 3500", 1)[-1]
        return len("".join(after.replace(">>>", "").split())) > echo + 8

    tmux.wait_for(streaming, timeout=30, what="the completion streaming")
    tmux.keys("C-c")
    tmux.wait_for(lambda s: "· interrupted]" in s, what="the interrupted stats line")
    tmux.type("/stats")
    tmux.keys("Enter")
    tmux.wait_for(lambda s: "(1 interrupted)" in s, what="/stats after the interruption")

    tmux.keys("C-d")
    tmux.wait_for(lambda s: "[exit 0]" in s, what="a clean exit on Ctrl-D")
