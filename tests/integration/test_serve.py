"""`mtpcode serve --stdio` driven by real client processes: a Python subprocess
client, and the Neovim and Vim examples from docs/cli.md when those editors are
installed."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from runtime_helpers import greedy_done

from mtpcode.stops import code_stops

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 120


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def server_command(bundle: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "mtpcode", "serve", "--stdio", "-m", str(bundle), "--threads", "2", *args]


class Client:
    """A JSON-lines client of a real server process; a thread reads its stdout."""

    def __init__(self, bundle: Path, *args: str) -> None:
        self.proc = subprocess.Popen(server_command(bundle, *args), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.log: list[dict[str, Any]] = []  # every message, in arrival order
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = self.recv()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.messages.put(json.loads(line))
        self.messages.put(None)

    def send(self, obj: Any) -> None:
        self.send_raw(json.dumps(obj).encode() + b"\n")

    def send_raw(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def recv(self) -> dict[str, Any]:
        msg = self.messages.get(timeout=TIMEOUT)
        assert msg is not None, f"server exited: {self.proc.wait()} {self.proc.stderr.read().decode()}"
        self.log.append(msg)
        return msg

    def until(self, pred) -> list[dict[str, Any]]:
        """Receive until a message satisfies ``pred``; return all received, that one last."""
        got = []
        while True:
            got.append(self.recv())
            if pred(got[-1]):
                return got

    def result(self, request_id: Any) -> tuple[str, dict[str, Any]]:
        """Wait for the final message of ``request_id``: (concatenated deltas, final message)."""
        msgs = self.until(lambda m: m.get("id") == request_id and ("done" in m or "error" in m))
        deltas = "".join(m["text"] for m in msgs if m.get("id") == request_id and "done" not in m and "text" in m)
        return deltas, msgs[-1]

    def close(self) -> int:
        self.proc.stdin.close()
        code = self.proc.wait(timeout=TIMEOUT)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code


@pytest.fixture
def client(tiny_bundle: Path):
    c = Client(tiny_bundle)
    yield c
    if c.proc.poll() is None:
        c.proc.kill()
        c.proc.wait()


def test_ready_answers_and_reuses_the_prefix(client: Client, engine, tiny_bundle: Path) -> None:
    assert client.ready == {"id": None, "ready": True, "model": str(tiny_bundle), "builtin": False, "heads": 3,
                            "n_ctx": 4096, "version": client.ready["version"]}
    prompt = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n"
    client.send({"id": 1, "prompt": prompt, "max_tokens": 12})
    text, done = client.result(1)
    assert done["done"] is True and done["stop_reason"] == "max_tokens"
    assert text == done["text"] == greedy_done(engine, prompt, 12).text
    first = done["stats"]
    assert first["prompt_tokens"] == first["prompt_tokens_processed"] == len(engine.tokenize(prompt))

    # The next prompt extends the first: only the new tokens are evaluated.
    longer = prompt + "    return a - b\n"
    client.send({"id": "two", "prompt": longer, "max_tokens": 12})
    text, done = client.result("two")
    assert text == done["text"] == greedy_done(engine, longer, 12).text
    s = done["stats"]
    assert s["prompt_tokens"] == len(engine.tokenize(longer))
    assert 0 < s["prompt_tokens_processed"] <= s["prompt_tokens"] - len(engine.tokenize(prompt)) + 1

    # The same prompt again costs at most one token.
    client.send({"id": 3, "prompt": longer, "max_tokens": 12})
    text, done = client.result(3)
    assert text == done["text"] and done["stats"]["prompt_tokens_processed"] <= 1
    assert client.close() == 0


def test_prefix_suffix_and_options(client: Client, engine) -> None:
    prefix, suffix = "import os\n", "\nprint(os.name)\n"
    client.send({"id": 1, "prefix": prefix, "suffix": suffix, "max_tokens": 16, "block": True, "lines": 3,
                 "stop": ["zz"]})
    text, done = client.result(1)
    expected = greedy_done(engine, prefix, 16, code_stops(prefix, suffix=suffix, lines=3, block=True))
    assert text == done["text"] == expected.text and done["stop_reason"] == expected.stop_reason
    # Options per request: no speculation, sampling with a seed.
    client.send({"id": 2, "prompt": prefix, "max_tokens": 8, "heads": 0, "temperature": 0.8, "seed": 5})
    _, done = client.result(2)
    assert done["stats"]["heads_used"] == 0 and done["stats"]["seed"] == 5
    client.send({"id": 3, "prompt": prefix, "max_tokens": 8, "heads": 0, "temperature": 0.8, "seed": 5})
    _, again = client.result(3)
    assert again["text"] == done["text"]
    assert client.close() == 0


def test_interleaved_malformed_and_cancelled(client: Client) -> None:
    long = {"max_tokens": 3000}
    client.send({"id": "A", "prompt": "def main():\n", **long})
    client.send({"id": "B", "prompt": "import sys\n", "max_tokens": 6})
    client.send({"id": "C", "prompt": "import re\n", "max_tokens": 6})
    bad_lines = [
        b"{not json\n",
        b"[1, 2]\n",
        b'{"prompt": "x"}\n',
        b"\xff\xfe\n",
        json.dumps({"id": "D", "prompt": "x", "bogus": 1}).encode() + b"\n",
        json.dumps({"id": "E", "prompt": ""}).encode() + b"\n",
        json.dumps({"id": "F", "prompt": "x", "prefix": "y"}).encode() + b"\n",
        json.dumps({"id": "G", "prompt": "x", "temperature": -1}).encode() + b"\n",
        json.dumps({"id": "A", "prompt": "again"}).encode() + b"\n",
    ]
    for line in bad_lines:
        client.send_raw(line)
    client.send({"cancel": "C"})
    client.send({"cancel": "nobody"})  # unknown ids are ignored
    # Every bad line is answered, and C's cancellation too, while A is still generating.
    errors = []
    c_done = None
    while len(errors) < len(bad_lines) or c_done is None:
        msg = client.recv()
        assert not (msg.get("id") == "A" and "done" in msg), "A finished before the bad lines were answered"
        if "error" in msg:
            errors.append(msg)
        elif msg.get("id") == "C":
            c_done = msg
    assert [e["id"] for e in errors] == [None, None, None, None, "D", "E", "F", "G", "A"]
    assert "malformed JSON" in errors[0]["error"] and "JSON object" in errors[1]["error"]
    assert '"id"' in errors[2]["error"] and "UTF-8" in errors[3]["error"]
    assert "bogus" in errors[4]["error"] and "empty prompt" in errors[5]["error"]
    assert "either" in errors[6]["error"] and "temperature" in errors[7]["error"]
    assert "still running" in errors[8]["error"]
    assert c_done == {"id": "C", "done": True, "text": "", "stop_reason": "cancelled", "stats": None}

    # Cancel A once it has produced text; B then runs.
    client.until(lambda m: m.get("id") == "A" and m.get("text"))
    client.send({"cancel": "A"})
    _, done_a = client.result("A")
    assert done_a["stop_reason"] == "cancelled" and done_a["stats"]["generated_tokens"] < 3000
    a_deltas = "".join(m["text"] for m in client.log if m.get("id") == "A" and "done" not in m and "text" in m)
    assert done_a["text"] == a_deltas
    _, done_b = client.result("B")
    assert done_b["stop_reason"] == "max_tokens"
    # Requests run in order: every message of B comes after A's final one.
    order = [i for i, m in enumerate(client.log) if m.get("id") in ("A", "B") and ("text" in m or "done" in m)]
    ids = [client.log[i]["id"] for i in order]
    assert ids == sorted(ids)
    assert not any(m.get("id") == "C" and "text" in m and "done" not in m for m in client.log)
    assert client.close() == 0


def test_context_overflow_is_an_error_reply(tiny_bundle: Path) -> None:
    client = Client(tiny_bundle, "--ctx", "32")
    try:
        client.send({"id": 1, "prompt": "import os\n" * 30})
        _, msg = client.result(1)
        assert "error" in msg and "context" in msg["error"]
        client.send({"id": 2, "prompt": "import os\n", "max_tokens": 4})
        _, done = client.result(2)
        assert done["done"] is True
    finally:
        assert client.close() == 0


def test_eof_finishes_queued_requests(tiny_bundle: Path) -> None:
    proc = subprocess.run(
        server_command(tiny_bundle),
        input=b'{"id": 1, "prompt": "import os\\n", "max_tokens": 5}\n{"id": 2, "prompt": "x = ", "max_tokens": 5}\n',
        capture_output=True, env=_env(), timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    finals = [m for m in map(json.loads, proc.stdout.splitlines()) if m.get("done")]
    assert [m["id"] for m in finals] == [1, 2]
    assert proc.stderr == b""


def test_bad_model_exits_before_serving(tmp_path: Path) -> None:
    proc = subprocess.run(server_command(tmp_path / "nope"), input=b"", capture_output=True, env=_env(),
                          timeout=TIMEOUT)
    assert proc.returncode == 66 and proc.stdout == b""
    assert proc.stderr.decode().startswith("mtpcode: error: model not found")


# --- the editor examples in docs/cli.md -------------------------------------------------------


def doc_block(language: str) -> str:
    text = (REPO / "docs" / "cli.md").read_text()
    blocks = re.findall(rf"```{language}\n(.*?)```", text, re.S)
    assert len(blocks) == 1, f"expected one ```{language} block in docs/cli.md"
    return blocks[0]


def shell_example(language: str) -> str:
    """The ```language block of the "### Shell" section of docs/cli.md."""
    text = (REPO / "docs" / "cli.md").read_text()
    section = text.split("### Shell", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(rf"```{language}\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    return blocks[0]


@pytest.fixture
def shim_path(tmp_path: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An environment where `mtpcode` runs this checkout on the tiny bundle."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "mtpcode"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m mtpcode \"$@\"\n")
    shim.chmod(0o755)
    env = _env()
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", MTPCODE_MODEL=str(tiny_bundle), MTPCODE_THREADS="2")
    return env


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed")
def test_shell_one_liner_example(shim_path: dict[str, str], engine) -> None:
    proc = subprocess.run(["sh", "-c", shell_example("sh")], env=shim_path, capture_output=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    prompt = "def add(a, b):\n"
    expected = greedy_done(engine, prompt, 32, code_stops(prompt, block=True)).text
    assert proc.stdout.decode() == expected + "\n"  # jq -r adds the newline


def test_shell_coprocess_example(shim_path: dict[str, str]) -> None:
    proc = subprocess.run(["bash", "-c", shell_example("bash")], env=shim_path, capture_output=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    finals = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [m["id"] for m in finals] == [1, 2] and all(m["done"] for m in finals)
    second = finals[1]["stats"]
    assert second["prompt_tokens_processed"] < second["prompt_tokens"]  # the cached prefix was reused


BUFFER = ["import os", "", "def main():", "    x = 1", "", "print(main())"]
CURSOR = (4, 9)  # line 4, after "    x = 1" (1-based line, 0-based byte column)
EDITOR_ARGS = ("--max-tokens", "24")


def expected_buffer(engine) -> list[str]:
    lines = BUFFER
    row, col = CURSOR
    prefix = "\n".join(lines[: row - 1] + [lines[row - 1][:col]])
    suffix = "\n".join([lines[row - 1][col:]] + lines[row:])
    done = greedy_done(engine, prefix, 24, code_stops(prefix, suffix=suffix, block=True))
    assert done.text.strip(), "the tiny model completes nothing here: the editor tests would prove nothing"
    return (prefix + done.text + suffix).split("\n")


@pytest.mark.skipif(shutil.which("nvim") is None, reason="Neovim is not installed")
def test_neovim_example(tmp_path: Path, tiny_bundle: Path, engine) -> None:
    lua_dir = tmp_path / "lua"
    lua_dir.mkdir()
    (lua_dir / "mtpcode.lua").write_text(doc_block("lua"))
    (tmp_path / "buffer.py").write_text("\n".join(BUFFER) + "\n")
    out = tmp_path / "result.txt"
    cmd = json.dumps(server_command(tiny_bundle, *EDITOR_ARGS))
    script = tmp_path / "drive.lua"
    script.write_text(f"""
package.path = {json.dumps(str(lua_dir) + "/?.lua")} .. ";" .. package.path
local m = require("mtpcode")
m.start(vim.fn.json_decode({json.dumps(cmd)}))
vim.o.virtualedit = "onemore"  -- normal mode: let the cursor sit after the line's end, as in insert mode
vim.api.nvim_win_set_cursor(0, {{{CURSOR[0]}, {CURSOR[1]}}})
local finished = false
m.complete(function() finished = true end)
local ok = vim.wait({TIMEOUT * 1000}, function() return finished end, 50)
vim.fn.writefile(ok and vim.api.nvim_buf_get_lines(0, 0, -1, false) or {{"TIMEOUT"}}, {json.dumps(str(out))})
vim.cmd("qall!")
""")
    proc = subprocess.run(["nvim", "--headless", "--clean", "-n", str(tmp_path / "buffer.py"),
                           "-c", f"luafile {script}"],
                          env=_env(), capture_output=True, timeout=TIMEOUT + 30)
    assert out.exists(), proc.stderr.decode()
    assert out.read_text().split("\n")[:-1] == expected_buffer(engine)


@pytest.mark.skipif(shutil.which("vim") is None, reason="Vim is not installed")
def test_vim_example(tmp_path: Path, tiny_bundle: Path, engine) -> None:
    probe = subprocess.run(["vim", "--version"], capture_output=True, text=True)
    if "+job" not in probe.stdout:
        pytest.skip("this Vim has no +job")
    plugin = tmp_path / "mtpcode.vim"
    plugin.write_text(doc_block("vim"))
    (tmp_path / "buffer.py").write_text("\n".join(BUFFER) + "\n")
    out = tmp_path / "result.txt"
    script = tmp_path / "drive.vim"
    script.write_text(f"""
let g:mtpcode_command = {json.dumps(server_command(tiny_bundle, *EDITOR_ARGS))}
source {plugin}
set virtualedit=onemore
call cursor({CURSOR[0]}, {CURSOR[1] + 1})
let g:finished = 0
autocmd User MtpcodeDone let g:finished = 1
call MtpcodeComplete()
let s:start = reltime()
while !g:finished && reltimefloat(reltime(s:start)) < {TIMEOUT}
  sleep 50m
endwhile
call writefile(g:finished ? getline(1, '$') : ['TIMEOUT'], {json.dumps(str(out))})
qall!
""")
    proc = subprocess.run(["vim", "-Nu", "NONE", "-i", "NONE", "-n", "-es", str(tmp_path / "buffer.py"),
                           "-S", str(script)], env=_env(), capture_output=True, timeout=TIMEOUT + 30)
    assert out.exists(), proc.stdout.decode() + proc.stderr.decode()
    assert out.read_text().split("\n")[:-1] == expected_buffer(engine)


def test_ctrl_c_ends_the_running_request_then_exits_130(client: Client) -> None:
    import signal

    client.send({"id": 1, "prompt": "def main():\n", "max_tokens": 3000})
    client.until(lambda m: m.get("id") == 1 and m.get("text"))
    client.proc.send_signal(signal.SIGINT)
    _, done = client.result(1)
    assert done["stop_reason"] == "cancelled" and done["stats"]["generated_tokens"] < 3000
    assert client.proc.wait(timeout=TIMEOUT) == 130
    assert client.proc.stderr.read().decode() == "mtpcode: interrupted\n"
