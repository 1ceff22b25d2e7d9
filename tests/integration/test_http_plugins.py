"""The real llama.vim plugin, unmodified, in Vim under tmux, against `mtpcode serve --http`.

The plugin is not part of this repository: point LLAMA_VIM at a checkout of
https://github.com/ggml-org/llama.vim (its autoload/ and plugin/ folders). The
tests skip without it, or without vim, tmux or curl (the plugin runs curl).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.http_helpers import HttpServer

PLUGIN = Path(os.environ.get("LLAMA_VIM", "")).expanduser()

pytestmark = [
    pytest.mark.skipif(not (PLUGIN / "autoload" / "llama.vim").is_file(),
                       reason="set LLAMA_VIM to a checkout of github.com/ggml-org/llama.vim"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("vim", "tmux", "curl")), reason="needs vim, tmux and curl"),
]

SOURCE = "import os\n\n\ndef read_file(path):\n    with open(path) as f:\n        return f.read()\n\n\n" \
         "def write_file(path, text):\n"
# a second editor's file: other text from its first line on (no line of it starts with "with")
OTHER_SOURCE = "import json\n\n\nclass Store:\n    def __init__(self, path):\n        self.path = path\n\n" \
               "    def load(self):\n        return json.loads(open(self.path).read())\n\n    def save(self, data):\n"
TYPED = "with"  # what each editor types on a new last line


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=30).stdout


def wait_for(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def start_vim(tmp_path: Path, name: str, source: str, url: str, session: str,
              env: dict[str, str] | None = None) -> Path:
    """Vim with the plugin (its README's setup: only ``endpoint_fim`` set) editing a new file
    ``name`` holding ``source``, in a detached tmux session; the file's path."""
    vimrc = tmp_path / f"vimrc-{name}"
    vimrc.write_text(
        "set nocompatible\n"
        f"set rtp^={PLUGIN}\n"
        f"let g:llama_config = {{'endpoint_fim': '{url}/infill'}}\n"
        "filetype plugin indent on\nset noswapfile\n"
    )
    src = tmp_path / name
    src.write_text(source)
    extra = [a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")]
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "30", *extra, f"vim -Nu {vimrc} {src}")
    return src


def type_new_last_line(sessions: list[str]) -> None:
    """In each session at once: a new line after the last one, then TYPED on it."""
    for keys in ("G", "o", "    " + TYPED):
        for session in sessions:
            tmux("send-keys", "-t", session, keys)
        time.sleep(0.3)


def ghost_text(session: str, row: int) -> str:
    """The suggestion shown after TYPED on screen row ``row`` (the new line), without the plugin's
    info text ("   | c: ..."); empty when none is shown."""
    screen = tmux("capture-pane", "-t", session, "-p").splitlines()
    line = screen[row].strip() if row < len(screen) else ""
    line = line.split(" | c: ")[0].rstrip()
    return line[len(TYPED):] if line.startswith(TYPED) else ""


def save_and_quit(session: str) -> None:
    tmux("send-keys", "-t", session, "Escape")
    time.sleep(0.3)
    tmux("send-keys", "-t", session, ":wq", "Enter")


def accepted_line(src: Path, source: str) -> str:
    """The line the editor added after ``source`` (its first line), stripped."""
    written = src.read_text()
    assert written.startswith(source), written
    return written[len(source):].split("\n")[0].strip()


def test_llama_vim_ghost_text_and_accept(tmp_path: Path) -> None:
    server = HttpServer()  # the built-in model: completions that look like code
    session = f"mtpcode-llamavim-{os.getpid()}"
    try:
        src = start_vim(tmp_path, "demo.py", SOURCE, server.url, session)
        time.sleep(1.5)
        type_new_last_line([session])
        row = SOURCE.count("\n")  # the new line's screen row: the file fits in the window

        shown = wait_for(lambda: ghost_text(session, row).strip(), timeout=120)
        assert shown, tmux("capture-pane", "-t", session, "-p")
        time.sleep(2)  # let the plugin settle (it sends a speculative follow-up request after showing a hint)
        assert ghost_text(session, row).strip()
        tmux("send-keys", "-t", session, "Tab")  # accept the suggestion
        time.sleep(0.5)
        save_and_quit(session)
        assert wait_for(lambda: src.read_text() != SOURCE)
        accepted = accepted_line(src, SOURCE)
        assert accepted.startswith(TYPED) and len(accepted) > len(TYPED) + 2, src.read_text()
        assert server.metrics()["mtpcode:requests_finished_total"] >= 1
    finally:
        tmux("kill-session", "-t", session)
        assert server.stop() == 0


# `mtpcode serve -v`: "request N (HOST:PORT /infill): slot S, ..." when a request starts
STARTED = re.compile(r"request (\d+) \((127\.0\.0\.\d+):\d+ /infill\): slot (\d+),")


def test_two_llama_vim_instances_on_one_server(tmp_path: Path) -> None:
    """Two Vims with llama.vim, each on its own file, type at the same time on one server (the
    default four slots). Both get suggestions and accept them; no request of either is cancelled,
    dropped or failed. llama.vim sends ``"id_slot":0`` in every request (FIM and ring-buffer
    warm-ups; no setting changes it), so both run on slot 0, one after the other, as on
    llama-server.

    To tell the two editors apart in the server's log, each one's curl binds another loopback
    address (``interface`` in a .curlrc found through CURL_HOME); the plugin is unchanged."""
    server = HttpServer("-v")
    editors = {"a": (SOURCE, "127.0.0.2"), "b": (OTHER_SOURCE, "127.0.0.3")}
    for _, address in editors.values():
        probe = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--interface", address,
                                server.url + "/health"], capture_output=True, text=True, timeout=30)
        if probe.stdout != "200":
            server.kill()
            pytest.skip(f"curl cannot bind {address} here")
    sessions = {name: f"mtpcode-llamavim-{name}-{os.getpid()}" for name in editors}
    try:
        files = {}
        for name, (source, address) in editors.items():
            home = tmp_path / f"curl-{name}"
            home.mkdir()
            (home / ".curlrc").write_text(f"interface = {address}\n")
            files[name] = start_vim(tmp_path, f"{name}.py", source, server.url, sessions[name],
                                    env={"CURL_HOME": str(home)})
        time.sleep(1.5)
        type_new_last_line(list(sessions.values()))
        rows = {name: source.count("\n") for name, (source, _) in editors.items()}

        def both_shown() -> bool:
            return all(ghost_text(sessions[n], rows[n]).strip() for n in editors)

        shown = wait_for(both_shown, timeout=120)
        screens = "\n".join(tmux("capture-pane", "-t", s, "-p") for s in sessions.values())
        assert shown, screens + "".join(server.stderr)
        time.sleep(2)  # the speculative follow-ups
        assert both_shown(), screens

        # what the server saw while both typed (before quitting, whose killed curl jobs are disconnects)
        runs = [(m.group(2), int(m.group(3))) for m in map(STARTED.search, list(server.stderr)) if m]
        assert {address for address, _ in runs} == {address for _, address in editors.values()}, runs
        assert {slot for _, slot in runs} == {0}, f"llama.vim sends id_slot 0: {runs}"
        metrics = server.metrics()
        assert metrics["mtpcode:requests_finished_total"] >= 2, metrics
        for counter in ("cancelled", "dropped", "failed"):
            assert metrics[f"mtpcode:requests_{counter}_total"] == 0, ("".join(server.stderr), metrics)

        for session in sessions.values():
            tmux("send-keys", "-t", session, "Tab")  # accept
        time.sleep(0.5)
        for session in sessions.values():
            save_and_quit(session)
        for name, (source, _) in editors.items():
            assert wait_for(lambda src=files[name], text=source: src.read_text() != text)
            accepted = accepted_line(files[name], source)
            assert accepted.startswith(TYPED) and len(accepted) > len(TYPED) + 2, (name, files[name].read_text())
    finally:
        for session in sessions.values():
            tmux("kill-session", "-t", session)
        assert server.stop() == 0
