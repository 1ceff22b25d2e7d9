"""The real llama.vim plugin, unmodified, in Vim under tmux, against `mtpcode serve --http`.

The plugin is not part of this repository: point LLAMA_VIM at a checkout of
https://github.com/ggml-org/llama.vim (its autoload/ and plugin/ folders). The
test skips without it, or without vim, tmux or curl (the plugin runs curl).
"""

from __future__ import annotations

import os
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


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=30).stdout


def wait_for(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_llama_vim_ghost_text_and_accept(tmp_path: Path) -> None:
    server = HttpServer()  # the built-in model: completions that look like code
    session = f"mtpcode-llamavim-{os.getpid()}"
    try:
        vimrc = tmp_path / "vimrc"
        vimrc.write_text(
            "set nocompatible\n"
            f"set rtp^={PLUGIN}\n"
            f"let g:llama_config = {{'endpoint_fim': '{server.url}/infill'}}\n"
            "filetype plugin indent on\nset noswapfile\n"
        )
        src = tmp_path / "demo.py"
        src.write_text(SOURCE)
        tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "30", f"vim -Nu {vimrc} {src}")
        time.sleep(1.5)
        for keys in ("G", "o", "    with"):
            tmux("send-keys", "-t", session, keys)
            time.sleep(0.3)

        def ghost_shown() -> bool:
            screen = tmux("capture-pane", "-t", session, "-p")
            line = next((ln for ln in screen.splitlines() if ln.strip().startswith("with")), "")
            return len(line.strip()) > len("with") + 2  # the suggestion follows what was typed

        assert wait_for(ghost_shown), tmux("capture-pane", "-t", session, "-p")
        time.sleep(2)  # let the plugin settle (it sends a speculative follow-up request after showing a hint)
        assert ghost_shown()
        tmux("send-keys", "-t", session, "Tab")  # accept the suggestion
        time.sleep(0.5)
        tmux("send-keys", "-t", session, "Escape")
        time.sleep(0.3)
        tmux("send-keys", "-t", session, ":wq", "Enter")
        assert wait_for(lambda: src.read_text() != SOURCE)
        written = src.read_text()
        assert written.startswith(SOURCE)
        accepted = written[len(SOURCE):].split("\n")[0]
        assert accepted.strip().startswith("with") and len(accepted.strip()) > len("with") + 2, written
        assert server.metrics()["mtpcode:requests_finished_total"] >= 1
    finally:
        tmux("kill-session", "-t", session)
        assert server.stop() == 0
