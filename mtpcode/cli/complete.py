"""``mtpcode complete``: complete the code in FILE (or stdin) and stream it to stdout.

Unix manners: stdout carries the completion and nothing else (with ``--echo``
the input too, with ``--json`` one JSON object); notes and stats go to stderr,
which stays silent when it is not a terminal, except for errors. Exit codes:
0 ok, 2 usage, 65 bad input data (empty, binary, not UTF-8, longer than the
context), 66 FILE missing, 69 model unavailable, 130 interrupted.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from mtpcode.cli.frontend import isatty, load_engine, silence_stdout, stats_dict
from mtpcode.cli.options import heads_option, model_option, repeat_stop_option, runtime_options, sampling_options
from mtpcode.config import load_settings
from mtpcode.errors import DataError, Interrupted, OutputError, UsageError
from mtpcode.files import read_file
from mtpcode.generation import Done, Piece
from mtpcode.signals import ctrl_c_cancels
from mtpcode.stops import StopCondition, code_stops

if TYPE_CHECKING:
    from mtpcode.generation import GenerationOptions
    from mtpcode.runtime import Engine

# --- input ----------------------------------------------------------------------------


def read_input(file: str | None) -> bytes:
    """The bytes of FILE, or of stdin when FILE is None or ``-``. NoInputError if FILE is missing."""
    if file is None or file == "-":
        stream = sys.stdin.buffer
        if isatty(stream) and isatty(sys.stderr):
            click.echo("mtpcode: reading code from the terminal; end it with Ctrl-D", err=True)
        return stream.read()
    return read_file(Path(file))


def decode_input(data: bytes, name: str) -> str:
    """Input bytes as text. DataError for empty or blank, binary (NUL bytes) or non-UTF-8 input."""
    if not data:
        raise DataError(f"{name} is empty: nothing to complete")
    if b"\x00" in data:
        raise DataError(f"{name} looks binary (it contains NUL bytes); give source code as UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{name} is not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "convert it with e.g. `iconv -t UTF-8`"
        ) from None
    if not text.strip():
        raise DataError(f"{name} has only whitespace: nothing to complete")
    return text


def parse_cursor(spec: str) -> tuple[int, int]:
    """``LINE:COL`` (both 1-based) -> (line, col). UsageError if malformed."""
    line_s, sep, col_s = spec.partition(":")
    try:
        if not sep:
            raise ValueError
        line, col = int(line_s), int(col_s)
    except ValueError:
        raise UsageError(f"--cursor {spec!r}: expected LINE:COL, e.g. --cursor 12:5 (both count from 1)") from None
    if line < 1 or col < 1:
        raise UsageError(f"--cursor {spec}: LINE and COL count from 1")
    return line, col


def cursor_offset(text: str, line: int, col: int) -> int:
    """Character offset of (line, col) in ``text``; both 1-based, COL in characters.

    COL may be one past the end of the line (the cursor after its last
    character). UsageError if the position is outside the text.
    """
    lines = text.split("\n")
    if line > len(lines):
        raise UsageError(f"--cursor {line}:{col} is outside the input: it has {len(lines)} lines")
    current = lines[line - 1]
    length = len(current) - (1 if current.endswith("\r") else 0)
    if col > length + 1:
        raise UsageError(
            f"--cursor {line}:{col} is outside the input: line {line} has {length} characters "
            f"(the cursor can be at column 1..{length + 1})"
        )
    return sum(len(ln) + 1 for ln in lines[: line - 1]) + col - 1


# --- the command ------------------------------------------------------------------------


@dataclass
class CompletionRequest:
    """What to complete, after reading and checking the input."""

    raw: bytes  # the input as given, for --echo
    prompt: str  # text before the cursor
    suffix: str | None  # text after the cursor (None without --cursor)


def build_request(file: str | None, cursor: str | None) -> CompletionRequest:
    name = "stdin" if file in (None, "-") else str(file)
    # Check the option before reading a possibly endless stdin.
    position = parse_cursor(cursor) if cursor is not None else None
    raw = read_input(file)
    text = decode_input(raw, name)
    if position is None:
        return CompletionRequest(raw=raw, prompt=text, suffix=None)
    offset = cursor_offset(text, *position)
    if offset == 0:
        raise DataError(f"--cursor {cursor} is at the start of {name}: there is no code before it to complete")
    return CompletionRequest(raw=raw, prompt=text[:offset], suffix=text[offset:])


def stats_json(done: Done | None, text: str, stop_reason: str, model: Path) -> dict[str, Any]:
    """The --json object; ``done`` is None when the generation was cut short before it ended."""
    out: dict[str, Any] = {"text": text, "stop_reason": stop_reason, "model": str(model)}
    out["stats"] = stats_dict(done.stats) if done is not None else None
    return out


def stream_completion(
    engine: Engine,
    prompt: str,
    options: GenerationOptions,
    stops: Sequence[StopCondition],
    out: IO[bytes] | None,
    written: list[str] | None = None,
    cancel: threading.Event | None = None,
) -> tuple[str, Done]:
    """Run one generation, writing each piece to ``out`` (flushed) as it comes.

    Returns the text written and the Done event. Pieces are also appended to
    ``written``, so that after a KeyboardInterrupt (which propagates) the
    caller knows what was output.
    """
    written = [] if written is None else written
    for event in engine.generate(prompt, options, stops, cancel=cancel):
        if isinstance(event, Piece):
            if event.text:
                written.append(event.text)
                if out is not None:
                    out.write(event.text.encode("utf-8"))
                    out.flush()
        elif isinstance(event, Done):
            return "".join(written), event
    raise RuntimeError("Engine.generate ended without a Done event")


@click.command("complete")
@click.argument("file", required=False)
@model_option
@click.option("-n", "--max-tokens", type=int, help="Stop after this many tokens [default: 256].")
@sampling_options
@click.option("-s", "--stop", "stop", multiple=True,
              help="Stop before this string (repeatable; \\n and \\t are understood).")
@heads_option
@click.option("--no-speculative", is_flag=True, help="Plain decoding, no draft heads (same as --heads 0).")
@click.option("--no-context-draft", is_flag=True,
              help="Draft with the heads only, not from the context (the input, the suffix, the output so far).")
@repeat_stop_option
@runtime_options
@click.option("--cursor", metavar="LINE:COL",
              help="Complete at this point of the input (1-based); the rest is the suffix.")
@click.option("--echo", is_flag=True, help="Print the input with the completion in place (for filters like Vim's :%!).")
@click.option("--lines", type=int, metavar="N", help="Stop after N non-blank lines.")
@click.option("--block", is_flag=True, help="Stop when a line leaves the block at the cursor (complete one body).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, stop_reason, stats.")
@click.option("-v", "--stats", "show_stats", is_flag=True, help="Print model and speed on stderr.")
def complete(
    file: str | None,
    model: str | None,
    max_tokens: int | None,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    min_p: float | None,
    seed: int | None,
    stop: tuple[str, ...],
    heads: int | None,
    no_speculative: bool,
    no_context_draft: bool,
    repeat_stop: bool | None,
    threads: int | None,
    threads_batch: int | None,
    gpu_layers: int | None,
    ctx: int | None,
    cursor: str | None,
    echo: bool,
    lines: int | None,
    block: bool,
    as_json: bool,
    show_stats: bool,
) -> None:
    """Complete the code in FILE (default: stdin) and stream the completion to stdout.

    \b
    Examples:
      mtpcode complete app.py --lines 3
      printf 'def fib(n):\\n' | mtpcode complete --block
      mtpcode complete app.py --cursor 12:5 --echo > app.completed.py
      mtpcode complete app.py --json | jq .stats.decode_tokens_per_s

    \b
    Exit codes: 0 ok, 2 bad usage, 65 bad input (empty, binary, not UTF-8,
    longer than the context), 66 FILE missing, 69 model unavailable,
    130 interrupted (what was generated is already written).
    """
    if no_speculative:
        if heads not in (None, 0):
            raise UsageError("--no-speculative and --heads N contradict each other; give one")
        heads = 0
    if lines is not None and lines < 1:
        raise UsageError("--lines must be at least 1")
    if as_json and echo:
        raise UsageError("--json and --echo cannot be combined (--json prints the completion alone)")
    settings = load_settings(
        model=model, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, seed=seed, heads=heads, threads=threads, threads_batch=threads_batch, gpu_layers=gpu_layers,
        ctx=ctx, context_draft=False if no_context_draft else None, repeat_stop=repeat_stop,
    )
    request = build_request(file, cursor)
    stop_strings = tuple(unescape(s) for s in stop)
    options = settings.generation_options(stop=tuple(s for s in stop_strings if s), suffix=request.suffix or "")
    stops = code_stops(request.prompt, suffix=request.suffix, lines=lines, block=block)

    if sys.stdout is None:  # started with stdout closed (`>&-`): nowhere to put the completion
        raise OutputError("stdout is closed: redirect it to a file or a pipe")
    talk = show_stats or isatty(sys.stderr)
    t0 = time.perf_counter()
    engine, path = load_engine(settings, model, note=sys.stderr if talk else None)
    out = sys.stdout.buffer
    try:
        with engine:
            _run(engine, path, request, options, stops, out, as_json=as_json, echo=echo,
                 show_stats=show_stats, t0=t0)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly with status 0. (click's
        # own EPIPE handling would exit 1, so this is done here.)
        silence_stdout()
        raise click.exceptions.Exit(0) from None
    except OSError as exc:  # a full disk, a closed descriptor: the completion could not be written
        silence_stdout()  # what is still buffered would fail again at exit
        raise OutputError(f"cannot write the completion to stdout: {exc.strerror or exc}") from None


def _run(engine: Engine, path: Path, request: CompletionRequest, options: GenerationOptions,
         stops: Sequence[StopCondition], out: IO[bytes], *,
         as_json: bool, echo: bool, show_stats: bool, t0: float) -> None:
    """Stream one completion to ``out`` (the body of ``complete`` once the model is loaded)."""
    if show_stats:
        click.echo(
            f"mtpcode: model {path} ({engine.n_heads} heads) loaded in {time.perf_counter() - t0:.2f} s",
            err=True,
        )
    prompt_bytes = len(request.prompt.encode("utf-8"))
    if echo:
        out.write(request.raw[:prompt_bytes])
        out.flush()
    written: list[str] = []
    cancel = threading.Event()
    try:
        with ctrl_c_cancels(cancel.set):
            text, done = stream_completion(engine, request.prompt, options, stops, None if as_json else out,
                                           written, cancel)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before generation started
        if as_json:
            partial = "".join(written)
            out.write((json.dumps(stats_json(None, partial, "interrupted", path)) + "\n").encode())
        elif echo and request.suffix:
            out.write(request.raw[prompt_bytes:])
        out.flush()
        raise Interrupted("interrupted; the completion so far was written") from None
    if cancel.is_set() or done.stop_reason == "interrupted":
        if as_json:
            out.write((json.dumps(stats_json(done, done.text, "interrupted", path)) + "\n").encode())
        elif echo and request.suffix:
            out.write(request.raw[prompt_bytes:])  # a filter must not lose the rest of the file
        out.flush()
        raise Interrupted("interrupted; the completion so far was written")
    if as_json:
        out.write((json.dumps(stats_json(done, done.text, done.stop_reason, path)) + "\n").encode())
    elif echo and request.suffix:
        out.write(request.raw[prompt_bytes:])
    elif isatty(out) and not text.endswith("\n"):
        out.write(b"\n")  # keep the shell prompt off the completion's last line
    out.flush()
    if show_stats:
        click.echo(f"mtpcode: {done.stop_reason}: {done.stats.summary()}", err=True)


def unescape(text: str) -> str:
    r"""Turn the escapes ``\n``, ``\t``, ``\r`` and ``\\`` of a --stop value into characters."""
    out = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            mapped = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}.get(nxt)
            if mapped is not None:
                out.append(mapped)
                i += 2
                continue
        out.append(ch)
        i += 1
    return "".join(out)
