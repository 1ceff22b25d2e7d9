"""`mtpcode complete` on a real tiny bundle: exact stdout, --json, --echo, code-aware
stops, every bad input, Ctrl-C and a closed pipe (real subprocesses for those)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from runtime_helpers import apply_stops

from mtpcode.cli import main
from mtpcode.generation import Done, GenerationOptions
from mtpcode.stops import SAME_LINE_REPEATS, BlockEnd, LineLimit, SuffixReached

REPO = Path(__file__).resolve().parents[2]

# Prompts without a trailing newline; the `structured` fixture picks the first
# whose greedy continuation has a non-blank line, a newline, then a line that
# starts at column 0 - what --lines, --block and --cursor need to cut.
CANDIDATES = [
    "    return self",
    "def main():\n    args = parse",
    "    print(",
    "        self.data",
    "    x = 1",
    "import os",
    "class A:\n    def f(self",
    "    for i in range(10",
    "if __name__ == '__main__'",
    "    y = x +",
]


def generate(engine, prompt: str, max_tokens: int, stops=(), **options) -> Done:
    done = None
    for event in engine.generate(prompt, GenerationOptions(max_tokens=max_tokens, **options), stops):
        if isinstance(event, Done):
            done = event
    assert done is not None
    return done


@pytest.fixture(scope="module")
def structured(engine) -> tuple[str, str, int]:
    """(prompt, its greedy 64-token continuation T, index of T's first newline)."""
    for prompt in CANDIDATES:
        text = generate(engine, prompt, 64).text
        i = text.find("\n")
        if i > 0 and text[:i].strip() and i + 1 < len(text) and not text[i + 1].isspace():
            return prompt, text, i
    pytest.fail("no candidate prompt gives the tiny model a multi-line continuation; add candidates")


def complete(bundle: Path, *args: str, input: bytes | None = None):
    cmd = ["complete", "-m", str(bundle), "--threads", "2", *args]
    return CliRunner().invoke(main, cmd, input=input, catch_exceptions=False)


# --- output ---------------------------------------------------------------------------


def test_stdout_is_exactly_the_completion(engine, tiny_bundle: Path) -> None:
    prompt = "def fib(n):\n    if n < 2:\n"
    result = complete(tiny_bundle, "-n", "32", input=prompt.encode())
    assert result.exit_code == 0, result.stderr
    expected = generate(engine, prompt, 32).text
    assert expected and result.stdout_bytes == expected.encode("utf-8")
    assert result.stderr == ""  # stderr is not a terminal: quiet
    plain = complete(tiny_bundle, "-n", "32", "--no-speculative", input=prompt.encode())
    assert plain.stdout_bytes == result.stdout_bytes  # greedy speculation changes nothing
    assert complete(tiny_bundle, "-n", "32", "--heads", "1", input=prompt.encode()).stdout_bytes == result.stdout_bytes


def test_what_drafting_learned_is_kept_in_the_cache_dir(tiny_bundle: Path) -> None:
    import os

    policies = Path(os.environ["MTPCODE_HOME"]) / "cache" / "policy"  # the tests' private MTPCODE_HOME
    assert complete(tiny_bundle, "-n", "48", input=b"def f(x):\n").exit_code == 0
    (saved,) = policies.glob("*.json")
    assert "greedy" in saved.read_text()
    assert complete(tiny_bundle, "-n", "8", "--no-speculative", input=b"x = 1\n").exit_code == 0
    assert list(policies.glob("*.json")) == [saved]  # plain decoding learns nothing, writes nothing new


def test_file_argument_and_dash(engine, tiny_bundle: Path, tmp_path: Path) -> None:
    src = tmp_path / "a.py"
    src.write_text("import os\n")
    from_file = complete(tiny_bundle, "-n", "8", str(src))
    from_dash = complete(tiny_bundle, "-n", "8", "-", input=b"import os\n")
    assert from_file.exit_code == 0 and from_file.stdout_bytes == from_dash.stdout_bytes
    assert from_file.stdout == generate(engine, "import os\n", 8).text


def test_json_and_stats(engine, tiny_bundle: Path) -> None:
    prompt = "import sys\n"
    plain = complete(tiny_bundle, "-n", "24", input=prompt.encode())
    result = complete(tiny_bundle, "-n", "24", "--json", input=prompt.encode())
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert obj["text"] == plain.stdout and obj["stop_reason"] == "max_tokens"
    assert obj["model"] == str(tiny_bundle)
    s = obj["stats"]
    assert s["generated_tokens"] == 24 and s["heads_used"] == 3
    assert s["prompt_tokens"] == len(engine.tokenize(prompt))
    assert s["main_forwards"] >= 1 and s["tokens_per_forward"] == pytest.approx(24 / s["main_forwards"], abs=1e-3)
    assert len(s["acceptance"]) == len(s["drafted_tokens"]) == len(s["accepted_tokens"]) == 3
    for a, acc, d in zip(s["acceptance"], s["accepted_tokens"], s["drafted_tokens"]):
        assert a == pytest.approx(acc / d if d else 0.0, abs=1e-3) and 0 <= acc <= d
    assert s["decode_ms"] == pytest.approx(s["decode_s"] * 1000, abs=1e-2)
    assert s["decode_tokens_per_s"] == pytest.approx(24 / s["decode_s"], rel=1e-2)

    # --stats: the same numbers as one human line on stderr, stdout unchanged.
    verbose = complete(tiny_bundle, "-n", "24", "-v", input=prompt.encode())
    assert verbose.stdout == plain.stdout
    assert "24 tokens" in verbose.stderr and "heads 3" in verbose.stderr and "max_tokens" in verbose.stderr


def test_stop_strings(engine, tiny_bundle: Path) -> None:
    prompt = "import sys\n"
    text = generate(engine, prompt, 24).text
    start = next(i for i in range(2, len(text) - 3) if all(c.isalnum() or c in " ._(),:" for c in text[i : i + 3]))
    stop = text[start : start + 3]
    result = complete(tiny_bundle, "-n", "24", "--json", "--stop", stop, "--stop", "never here", input=prompt.encode())
    obj = json.loads(result.stdout)
    assert obj["text"] == text[: text.find(stop)] and obj["stop_reason"] == "stop"


def test_echo_reproduces_input_bytes(engine, tiny_bundle: Path) -> None:
    raw = "# caf\u00e9 \u2014 \U0001f600\r\nx = 'a'\r\n".encode("utf-8")
    completion = json.loads(complete(tiny_bundle, "-n", "16", "--json", input=raw).stdout)["text"]
    result = complete(tiny_bundle, "-n", "16", "--echo", input=raw)
    assert result.exit_code == 0
    assert result.stdout_bytes == raw + completion.encode("utf-8")


# --- code-aware stops -------------------------------------------------------------------


def test_lines(structured, tiny_bundle: Path) -> None:
    prompt, text, i = structured
    expected, reason = apply_stops(text, [LineLimit(1)])
    assert expected == text[:i] and reason == "lines"
    result = complete(tiny_bundle, "-n", "64", "--lines", "1", input=prompt.encode())
    assert result.stdout == expected
    obj = json.loads(complete(tiny_bundle, "-n", "64", "--lines", "1", "--json", input=prompt.encode()).stdout)
    assert obj["text"] == expected and obj["stop_reason"] == "lines"


def test_block(structured, tiny_bundle: Path) -> None:
    prompt, text, i = structured
    # The prompt's last line is indented (or, at column 0, not an opener) and the
    # continuation's second line starts at column 0: for indented prompts that leaves the block.
    expected, reason = apply_stops(text, [BlockEnd(prompt)])
    obj = json.loads(complete(tiny_bundle, "-n", "64", "--block", "--json", input=prompt.encode()).stdout)
    assert obj["text"] == expected and obj["stop_reason"] == (reason or "max_tokens")
    if prompt.split("\n")[-1].startswith(" "):
        assert reason == "block" and expected == text[:i].rstrip()


def test_cursor_stops_at_the_suffix_and_echo_puts_it_back(structured, tiny_bundle: Path, tmp_path: Path) -> None:
    prompt, text, i = structured
    rest = "REST)\nnext_line()\n"
    src = tmp_path / "src.py"
    src.write_bytes((prompt + rest).encode())
    lines = prompt.split("\n")
    cursor = f"{len(lines)}:{len(lines[-1]) + 1}"
    expected, reason = apply_stops(text, [SuffixReached(prompt, rest)])
    assert reason == "suffix" and expected == text[:i].rstrip() and expected != text
    obj = json.loads(complete(tiny_bundle, "-n", "64", "--cursor", cursor, "--json", str(src)).stdout)
    assert obj["text"] == expected and obj["stop_reason"] == "suffix"
    echoed = complete(tiny_bundle, "-n", "64", "--cursor", cursor, "--echo", str(src))
    assert echoed.exit_code == 0
    assert echoed.stdout_bytes == (prompt + expected + rest).encode()


def test_cursor_counts_characters_and_crlf(engine, tiny_bundle: Path, tmp_path: Path) -> None:
    src = tmp_path / "u.py"
    src.write_bytes("s = '\u00e9\u00e9'\r\nt = 1\r\n".encode())
    # Line 1, after the 8 characters of `s = 'éé'` (the \r is not a column).
    result = complete(tiny_bundle, "-n", "4", "--cursor", "1:9", "--json", str(src))
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["stats"]["prompt_tokens"] == len(engine.tokenize("s = '\u00e9\u00e9'"))
    assert complete(tiny_bundle, "--cursor", "1:10", str(src)).exit_code == 2


# --- bad input ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken_bundle(tiny_bundle: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("broken") / "b"
    shutil.copytree(tiny_bundle, path)
    (path / "head-2.gguf").unlink()
    return path


@pytest.fixture(scope="module")
def swapped_bundle(tiny_bundle: Path, tmp_path_factory) -> Path:
    """head-1 and head-2 swapped: every file present with the right size, heads mismatched."""
    path = tmp_path_factory.mktemp("swapped") / "b"
    shutil.copytree(tiny_bundle, path)
    (path / "head-1.gguf").rename(path / "tmp.gguf")
    (path / "head-2.gguf").rename(path / "head-1.gguf")
    (path / "tmp.gguf").rename(path / "head-2.gguf")
    return path


@pytest.mark.parametrize(
    "args,stdin,code,message",
    [
        ([], b"", 65, "stdin is empty"),
        ([], b"  \n\t\n", 65, "only whitespace"),
        ([], b"def f():\x00\x01\n", 65, "looks binary"),
        ([], b"x = '\xe9'\n", 65, "not UTF-8 text (invalid byte 0xe9 at offset 5)"),
        (["/nonexistent/file.py"], None, 66, "no such file"),
        (["{tmp}"], None, 66, "is a directory"),
        (["--cursor", "9:1", "{src}"], None, 2, "outside the input: it has 3 lines"),
        (["--cursor", "1:12", "{src}"], None, 2, "line 1 has 10 characters"),
        (["--cursor", "x", "{src}"], None, 2, "expected LINE:COL"),
        (["--cursor", "0:1", "{src}"], None, 2, "count from 1"),
        (["--cursor", "1:1", "{src}"], None, 65, "no code before it"),
        (["-m", "no-such-model"], b"x\n", 69, "unknown model 'no-such-model'"),
        (["-m", "/no/such/bundle"], b"x\n", 66, "model not found"),
        (["-m", "{broken}"], b"x\n", 69, "missing head-2.gguf"),
        (["-m", "{swapped}"], b"x\n", 69, "head-1.gguf does not belong to main.gguf"),
        (["--ctx", "16"], b"import os\n" * 20, 65, "context"),
        (["--heads", "7"], b"x\n", 2, "has 3 extra heads"),
        (["--heads", "2", "--no-speculative"], b"x\n", 2, "contradict"),
        (["--json", "--echo"], b"x\n", 2, "cannot be combined"),
        (["--lines", "0"], b"x\n", 2, "--lines must be at least 1"),
        (["--temperature", "-1"], b"x\n", 2, "must be >= 0"),
        (["--top-p", "2"], b"x\n", 2, "top_p"),
    ],
)
def test_bad_input(tiny_bundle: Path, broken_bundle: Path, swapped_bundle: Path, tmp_path: Path,
                   args, stdin, code, message) -> None:
    src = tmp_path / "src.py"
    src.write_text("x = foo(1)\ny = 2\n")
    args = [a.format(tmp=tmp_path, src=src, broken=broken_bundle, swapped=swapped_bundle) for a in args]
    model = [] if "-m" in args else ["-m", str(tiny_bundle)]
    result = CliRunner().invoke(main, ["complete", *model, "--threads", "2", *args], input=stdin)
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.startswith("mtpcode: error: ") and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_builtin_model_note(tiny_bundle: Path) -> None:
    from mtpcode.models import builtin_model_path

    if builtin_model_path() is None:
        pytest.skip("this checkout has no built-in model (mtpcode/builtin/)")
    result = CliRunner().invoke(main, ["complete", "-n", "4", "--threads", "2", "-v"], input=b"import os\n")
    assert result.exit_code == 0 and result.stderr.count("small built-in model") == 1
    quiet = CliRunner().invoke(main, ["complete", "-n", "4", "--threads", "2"], input=b"import os\n")
    assert quiet.exit_code == 0 and quiet.stderr == ""


@pytest.mark.parametrize("prompt", ["def fib(n):\n", "def fibonacci(n):\n"])
def test_a_degenerate_loop_ends_the_first_run_within_a_few_lines(prompt: str, monkeypatch) -> None:
    """A new user's first run: the small built-in model loops (a digit along a line, a line over
    and over); the repeat stop ends it, and --no-repeat-stop or the setting lets it run on."""
    from mtpcode.models import builtin_model_path

    if builtin_model_path() is None:
        pytest.skip("this checkout has no built-in model (mtpcode/builtin/)")

    def run(*args: str) -> dict:
        result = CliRunner().invoke(main, ["complete", "--block", "--json", "--threads", "2", *args],
                                    input=prompt.encode())
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    on = run()
    assert on["stop_reason"] == "repeat"
    lines = [line for line in on["text"].split("\n") if line.strip()]
    assert len(lines) <= 16 and max(lines.count(line) for line in lines) <= SAME_LINE_REPEATS
    assert on["stats"]["generated_tokens"] < 256
    off = run("--no-repeat-stop")
    assert off["stop_reason"] == "max_tokens" and off["text"].startswith(on["text"])
    monkeypatch.setenv("MTPCODE_REPEAT_STOP", "off")
    assert run()["stop_reason"] == "max_tokens"


# --- real processes: Ctrl-C and a closed pipe --------------------------------------------------


def _spawn(bundle: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-m", "mtpcode", "complete", "-m", str(bundle), "--threads", "2", *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )


def test_closed_pipe_exits_quietly(tiny_bundle: Path) -> None:
    proc = _spawn(tiny_bundle, "-n", "3000")
    proc.stdin.write(b"def main():\n")
    proc.stdin.close()
    first = proc.stdout.read(1)  # blocks until generation has started
    assert first
    proc.stdout.close()  # `| head -c 1`
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""


@pytest.mark.parametrize("args", [(), ("--json",), ("--echo",)])
def test_stdout_that_cannot_be_written_is_one_line_and_exit_73(tiny_bundle: Path, args: tuple[str, ...]) -> None:
    """A full disk (/dev/full) or a closed stdout: one error line, exit 73, no traceback."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "mtpcode", "complete", "-m", str(tiny_bundle), "-n", "8", *args]
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(cmd, input=b"def main():\n", stdout=full, stderr=subprocess.PIPE, env=env,
                              timeout=120)
    assert proc.returncode == 73, proc.stderr
    assert proc.stderr.decode().splitlines() == [
        "mtpcode: error: cannot write the completion to stdout: No space left on device"]
    closed = subprocess.run(cmd, input=b"def main():\n", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env, timeout=120, preexec_fn=lambda: os.close(1))
    assert closed.returncode == 73, closed.stderr
    assert closed.stderr.decode().splitlines() == ["mtpcode: error: stdout is closed: redirect it to a file or a pipe"]


def test_ctrl_c_keeps_what_was_written(tiny_bundle: Path) -> None:
    from mtpcode.runtime import Engine

    prompt = "def main():\n"
    # Plain decoding on both sides: with drafting, how many rows each verify has depends on
    # timing, and over thousands of random-model tokens batched and single-row kernels can
    # round a near-tie differently. Interruption, not speculation, is under test here.
    proc = _spawn(tiny_bundle, "-n", "3000", "--no-speculative")
    proc.stdin.write(prompt.encode())
    proc.stdin.close()
    first = os.read(proc.stdout.fileno(), 1)
    assert first
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 130
    assert proc.stderr.read().decode() == "mtpcode: interrupted; the completion so far was written\n"
    out = (first + rest).decode("utf-8")
    # What was written is the start of the full greedy completion, and not all of it.
    with Engine(tiny_bundle, n_threads=2) as engine:
        full = generate(engine, prompt, 3000, heads=0).text
    assert full.startswith(out) and len(out) < len(full)
