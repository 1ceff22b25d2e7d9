"""The REPL: a small UI object around a prompt-toolkit session and an Engine.

The session keeps one growing text, the *session buffer* (a scratch file).
Submitting input appends it to the buffer (on a new line) and asks the model
to continue; the completion streams onto the screen, highlighted, is followed
by one stats line, and joins the buffer. An empty submit continues the
buffer as it is. Lines starting with ``/`` are commands (see ``/help``).

Input and output are injectable (prompt-toolkit ``Input``/``Output``), so
tests drive a real session through a pipe; the Engine is used only from the
:class:`~mtpcode.repl.suggest.EngineThread`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prompt_toolkit import PromptSession, print_formatted_text
from prompt_toolkit.formatted_text import FormattedText, PygmentsTokens
from prompt_toolkit.history import FileHistory, InMemoryHistory
from prompt_toolkit.lexers import DynamicLexer, PygmentsLexer
from prompt_toolkit.styles import Style, merge_styles, style_from_pygments_cls
from prompt_toolkit.utils import get_cwidth
from pygments.token import Token

from mtpcode.config import Settings
from mtpcode.errors import DataError, MtpError, OutputError, UsageError
from mtpcode.files import atomic_write_text, read_file
from mtpcode.generation import Done, GenerationOptions, Piece
from mtpcode.repl.edit import (
    editing_key_bindings,
    is_command,
    language_name,
    lexer_by_name,
    lexer_for_filename,
)
from mtpcode.repl.suggest import EngineThread, ModelSuggest

if TYPE_CHECKING:
    from prompt_toolkit.input import Input
    from prompt_toolkit.output import Output
    from pygments.lexer import Lexer

HISTORY_NAME = "repl_history"
PROMPT, CONTINUATION = ">>> ", "... "
GUTTER = " " * len(PROMPT)  # completion lines are indented like the input after the prompt
# The key hints of the bottom toolbar, most important first (the toolbar drops
# what does not fit the terminal's width).
KEY_HINTS = (
    "Enter submit/new line",
    "Alt-Enter submit",
    "Ctrl-J new line",
    "→ accept",
    "Alt-F word",
    "Ctrl-C cancel",
    "Ctrl-D quit",
    "/help",
)


def fit_hints(hints: tuple[str, ...], width: int, sep: str = " · ") -> str:
    """As many of ``hints`` as fit in ``width`` columns, joined by ``sep``."""
    out = ""
    for hint in hints:
        candidate = f"{out}{sep}{hint}" if out else hint
        if len(candidate) > width:
            break
        out = candidate
    return out


_NEWLINE = re.compile("\n")
_CONTEXT_CHARS = 2000  # text before a completion that is lexed with it, for correct colours

_UI_STYLE = {
    "bottom-toolbar": "noreverse bg:#262626 #a8a8a8",
    "bottom-toolbar.key": "bold #d7d7d7",
    "stats": "#808080",
    "info": "#5f87af",
    "error": "#ff5f5f",
    "prompt": "#5f87af bold",
    "auto-suggestion": "#6c6c6c",
}


def history_path(settings: Settings) -> Path:
    """The REPL's input history file: ``repl_history`` in the data directory."""
    return settings.data_dir / HISTORY_NAME


def join_input(session: str, typed: str) -> str:
    """The session buffer after submitting ``typed``: it starts on a new line; empty input adds nothing."""
    if not typed:
        return session
    if session and not session.endswith("\n"):
        session += "\n"
    return session + typed


# Control characters other than newline and tab would drive the terminal
# (a random or small model emits them): show them as their Unicode pictures.
_VISIBLE = {c: chr(0x2400 + c) for c in range(32) if chr(c) not in "\n\t"}
_VISIBLE[0x7F] = "\u2421"
_VISIBLE[ord("\r")] = ""


def visible(text: str) -> str:
    """``text`` safe to print: C0 controls but newline and tab as symbols (␛, ␎), carriage returns dropped."""
    return text.translate(_VISIBLE)


class StreamPrinter:
    """Prints streamed text with pygments colours, lexed together with the text before it.

    The last token is held back until more text arrives (an identifier may
    still turn into a keyword); :meth:`finish` prints the rest. ``gutter`` is
    put before every new line that has text, so the code lines up with the
    input typed after the prompt.
    """

    def __init__(
        self,
        lexer: Lexer,
        context: str,
        write: Callable[[list[tuple[Any, str]]], None],
        gutter: str = "",
        at_line_start: bool = False,
    ) -> None:
        self.lexer = lexer
        if len(context) > _CONTEXT_CHARS:
            # Start lexing at a line start, where a lexer's state is most likely the default one.
            cut = context.find("\n", len(context) - _CONTEXT_CHARS)
            context = context[cut + 1 :] if cut >= 0 else context[-_CONTEXT_CHARS:]
        self.context = context
        self.write = write
        self.gutter = gutter
        self.at_line_start = at_line_start
        self.text = ""
        self.shown = 0

    def feed(self, text: str) -> None:
        if text:
            self.text += text
            self._emit(final=False)

    def finish(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        full = self.context + self.text
        base = len(self.context)
        tokens = list(self.lexer.get_tokens_unprocessed(full))
        end = len(full)
        if not final and tokens:
            end = min(end, tokens[-1][0])
        start = base + self.shown
        fragments = []
        for index, ttype, value in tokens:
            lo, hi = max(index, start), min(index + len(value), end)
            if lo < hi:
                fragments.append((ttype, full[lo:hi]))
        if fragments:
            self.write(self._with_gutter(fragments))
            self.shown = end - base

    def _with_gutter(self, fragments: list[tuple[Any, str]]) -> list[tuple[Any, str]]:
        out: list[tuple[Any, str]] = []
        for ttype, value in fragments:
            for part in re.split(r"(\n)", value):
                if part == "\n":
                    self.at_line_start = True
                elif part:
                    if self.at_line_start and self.gutter:
                        out.append((Token.Text, self.gutter))
                    self.at_line_start = False
                else:
                    continue
                out.append((ttype, part))
        return out


@dataclass
class SessionTotals:
    """Sums over the completions of this session (for /stats)."""

    completions: int = 0
    generated_tokens: int = 0
    decode_s: float = 0.0
    main_forwards: int = 0
    interrupted: int = 0


class _Failed:
    """An exception raised on the engine thread, handed to the UI thread."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


# Keys of /set: (parser, check, what a valid value is).
def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("on", "true", "yes", "1"):
        return True
    if low in ("off", "false", "no", "0"):
        return False
    raise ValueError(text)


def _parse_opt_int(text: str) -> int | None:
    return None if text.lower() in ("none", "auto", "random") else int(text)


_SET_KEYS: dict[str, tuple[Callable[[str], Any], Callable[[Any], bool], str]] = {
    "temperature": (float, lambda v: 0 <= v < float("inf"), "a number >= 0 (0 = greedy)"),
    "top_k": (int, lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "top_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1] (1 = off)"),
    "min_p": (float, lambda v: 0 <= v < 1, "a number in [0, 1) (0 = off)"),
    "max_tokens": (int, lambda v: v >= 1, "an integer >= 1"),
    "heads": (_parse_opt_int, lambda v: v is None or v >= 0, "an integer >= 0 (0 = no drafting) or auto"),
    "seed": (_parse_opt_int, lambda v: v is None or v >= 0, "an integer >= 0 or none (random)"),
    "adaptive": (_parse_bool, lambda v: True, "on or off"),
    "suggest": (_parse_bool, lambda v: True, "on or off"),
    "suggest_tokens": (int, lambda v: 1 <= v <= 256, "an integer from 1 to 256"),
    "stop": (str, lambda v: True, "block, none, or a number of lines"),
    "language": (str, lambda v: True, "a pygments language name (python, c, rust, ...)"),
}
_SETTINGS_KEYS = ("temperature", "top_k", "top_p", "min_p", "max_tokens", "heads", "seed", "adaptive")


def parse_stop(text: str) -> str | int | None:
    """``block`` -> "block", ``none`` -> None, ``3`` / ``3 lines`` / ``lines 3`` -> 3. ValueError otherwise."""
    words = text.lower().replace("lines", " ").replace("line", " ").split()
    if text.lower().strip() == "block":
        return "block"
    if text.lower().strip() in ("none", "off", "max_tokens"):
        return None
    if len(words) == 1 and words[0].isdigit() and int(words[0]) >= 1:
        return int(words[0])
    raise ValueError(text)


def describe_stop(stop: str | int | None) -> str:
    if stop is None:
        return "none"
    return "block" if stop == "block" else f"{stop} line{'s' if stop != 1 else ''}"


COMMANDS: dict[str, tuple[str, str]] = {
    "help": ("/help", "show commands and keys"),
    "load": ("/load FILE", "replace the session buffer with FILE (its extension picks the highlighting)"),
    "save": ("/save FILE", "write the session buffer to FILE (atomically: temporary file + rename)"),
    "show": ("/show", "print the session buffer"),
    "clear": ("/clear", "empty the session buffer"),
    "undo": ("/undo", "take back the last submission and its completion"),
    "set": ("/set [KEY VALUE]", "change a setting; without arguments list the settings and their values"),
    "model": ("/model [NAME]", "switch to another model (a registered name or a bundle directory)"),
    "stats": ("/stats", "numbers of the last completion and of the whole session"),
    "quit": ("/quit", "leave the REPL (also /exit or Ctrl-D)"),
}
_ALIASES = {"exit": "quit", "q": "quit", "h": "help", "?": "help"}


class Repl:
    """One REPL session.

    ``engine`` is used as given (the caller closes it); otherwise the Engine
    for ``model_path`` is loaded by :meth:`run` and closed at the end. With
    neither, the session starts without a model (``/model NAME`` loads one).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        model_path: Path | None = None,
        engine: Any = None,
        model_name: str | None = None,
        language: str | None = None,
        stop: str | int | None = "block",
        suggest: bool = True,
        suggest_tokens: int = 16,
        style: str = "default",
        history: Path | None = None,
        input: Input | None = None,
        output: Output | None = None,
    ) -> None:
        self.settings = settings
        self.model_path = model_path
        if model_name is None and model_path is None and engine is not None:
            bundle = getattr(engine, "bundle", None)
            model_name = bundle.path.name if bundle is not None else "model"
        self.model_name = model_name or (model_path.name if model_path else None)
        self.engine = engine
        self._owns_engine = False
        self.lexer = lexer_by_name(language or "python")
        self.stop = stop
        self.suggest_enabled = suggest
        self.suggest_tokens = suggest_tokens
        self.text = ""  # the session buffer
        self.undo_stack: list[str] = []
        self.last_done: Done | None = None
        self.totals = SessionTotals()
        self.generating = threading.Event()  # set while a completion streams
        self._quit = False
        self._window_start = 0  # offset into self.text where the model's view begins (long sessions)
        self.worker = EngineThread()
        self.suggester = ModelSuggest(self, self.worker)
        self.style = self._make_style(style)
        self._lexers: dict[type, PygmentsLexer] = {}
        self._notes: list[str] = []
        if history is not None:
            try:
                history.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                self._notes.append(f"history is not kept: cannot create {history.parent} ({exc.strerror})")
                history = None
        self.session: PromptSession = PromptSession(
            message=FormattedText([("class:prompt", PROMPT)]),
            multiline=True,
            prompt_continuation=lambda width, line, soft: FormattedText([("class:prompt", CONTINUATION.rjust(width))]),
            lexer=DynamicLexer(self._prompt_lexer),
            auto_suggest=self.suggester,
            key_bindings=editing_key_bindings(lambda: self.lexer),
            history=FileHistory(str(history)) if history is not None else InMemoryHistory(),
            bottom_toolbar=self._toolbar,
            style=self.style,
            include_default_pygments_style=False,
            enable_history_search=False,
            input=input,
            output=output,
        )

    # --- setup --------------------------------------------------------------------------

    @staticmethod
    def _make_style(name: str) -> Any:
        from pygments.styles import get_style_by_name
        from pygments.util import ClassNotFound

        try:
            pygments_style = get_style_by_name(name)
        except ClassNotFound:
            raise UsageError(f"unknown pygments style {name!r} (try default, monokai, native, friendly)") from None
        return merge_styles([style_from_pygments_cls(pygments_style), Style.from_dict(_UI_STYLE)])

    def _prompt_lexer(self) -> PygmentsLexer:
        cls = type(self.lexer)
        if cls not in self._lexers:
            self._lexers[cls] = PygmentsLexer(cls)
        return self._lexers[cls]

    def _load_engine(self, path: Path) -> Any:
        from mtpcode.runtime import Engine

        future = self.worker.submit(lambda: Engine(path, **self.settings.engine_kwargs()))
        try:
            return future.result()
        except KeyboardInterrupt:
            # The load cannot be stopped half way; close what it makes once it is done.
            future.add_done_callback(lambda f: f.exception() is None and f.result().close())
            raise

    def open(self) -> None:
        """Load the model if one was named and none was given."""
        if self.engine is None and self.model_path is not None:
            self.info(f"loading {self.model_path} ...")
            self.engine = self._load_engine(self.model_path)
            self._owns_engine = True
        heads = self.settings.heads
        if self.engine is not None and heads is not None and heads > self.engine.n_heads:
            raise UsageError(
                f"--heads {heads}: the model has {self.engine.n_heads} draft heads; use --heads 0..{self.engine.n_heads}"
            )

    def close(self) -> None:
        """Stop suggestions, finish engine work, close an Engine this session loaded."""
        self.suggester.forget()
        self.worker.close()
        if self._owns_engine and self.engine is not None:
            self.engine.close()
            self.engine = None

    # --- output -------------------------------------------------------------------------

    def _print(self, text: Any, end: str = "\n") -> None:
        print_formatted_text(
            text, end=end, style=self.style, output=self.session.output, include_default_pygments_style=False
        )

    def info(self, message: str) -> None:
        self._print(FormattedText([("class:info", message)]))

    def error(self, message: str) -> None:
        self._print(FormattedText([("class:error", "error: " + message)]))

    def _print_code(self, text: str, context: str = "") -> None:
        printer = StreamPrinter(self.lexer, context, self._write_tokens)
        printer.feed(text)
        printer.finish()

    def _write_tokens(self, fragments: list[tuple[Any, str]]) -> None:
        self._print(PygmentsTokens([(t, visible(v)) for t, v in fragments]), end="")

    def _toolbar(self) -> FormattedText:
        model = f"{self.model_name} ({self.engine.n_heads} heads)" if self.engine is not None else "no model"
        lines = self.text.count("\n") + (1 if self.text and not self.text.endswith("\n") else 0)
        suggest = "on" if self.suggest_enabled else "off"
        if self.suggest_enabled and self.suggester.busy:
            suggest += " …"
        s = self.settings
        status = (
            f" {model} · {language_name(self.lexer)} · suggest {suggest} · temp {s.temperature:g} · "
            f"max {s.max_tokens} · stop {describe_stop(self.stop)} · buffer {lines} lines"
        )
        width = self.session.output.get_size().columns - 2
        keys = fit_hints(KEY_HINTS, width)
        return FormattedText([("class:bottom-toolbar.key", " " + keys), ("", "\n"), ("", status[: width + 1])])

    # --- the loop -----------------------------------------------------------------------

    def banner(self) -> None:
        model = self.model_name or "no model (use /model NAME)"
        heads = f", {self.engine.n_heads} draft heads" if self.engine is not None else ""
        self.info(f"mtpcode repl · {model}{heads} · {language_name(self.lexer)}")
        self.info("Type code; the model continues it. /help lists commands. Ctrl-D quits.")
        for note in self._notes:
            self.info(note)

    def run(self) -> None:
        """Read and handle inputs until /quit or Ctrl-D."""
        try:
            self.open()
            self.banner()
            self.warm_up()
            while not self._quit:
                try:
                    text = self.session.prompt()
                except KeyboardInterrupt:
                    continue  # Ctrl-C at the prompt drops the input, like Python's REPL
                except EOFError:
                    break
                self.handle(text)
        finally:
            self.close()

    def handle(self, text: str) -> None:
        """Run one submitted input: a command or code to continue."""
        try:
            if is_command(text):
                self.command(text.strip())
            else:
                self.submit(text)
        except KeyboardInterrupt:
            self.info("cancelled")
        except MtpError as exc:
            self.error(str(exc))

    # --- completions --------------------------------------------------------------------

    def prompt_for(self, typed: str) -> str | None:
        """The text the model continues for input ``typed`` (None: nothing to continue or a command)."""
        if is_command(typed):
            return None
        joined = join_input(self.text, typed)
        if not joined.strip():
            return None
        return joined[self._window_start :]

    def _fit_window(self, joined: str, count_tokens: Callable[[str], int]) -> str:
        """The tail of ``joined`` the model sees: all of it while it fits the context.

        When the session outgrows the context (less room for ``max_tokens``),
        the view jumps forward to a line start, leaving a quarter of the
        context free, and stays there, so later prompts share their prefix
        again. ``count_tokens`` must be safe to call from the current thread.
        """
        engine = self.engine
        room = max(16, engine.n_ctx - min(self.settings.max_tokens, engine.n_ctx // 2))
        view = joined[self._window_start :]
        # Every token covers at least one byte, so short text needs no tokenizing.
        if len(view.encode("utf-8")) + 2 <= room or count_tokens(view) <= room:
            return view
        target = room * 3 // 4
        starts = [m.end() for m in _NEWLINE.finditer(joined, self._window_start) if m.end() < len(joined)]
        # The token count falls as the start moves on: find the first line start that fits.
        lo, hi = 0, len(starts)
        while lo < hi:
            mid = (lo + hi) // 2
            if count_tokens(joined[starts[mid] :]) <= target:
                hi = mid
            else:
                lo = mid + 1
        start = starts[min(lo, len(starts) - 1)] if starts else self._window_start
        self._window_start = min(start, len(self.text))
        self.suggester.forget()
        return joined[start:]

    def _count_on_engine_thread(self, text: str) -> int:
        return len(self.worker.call(self.engine.tokenize, text))

    def warm_up(self) -> None:
        """Prefill the session buffer in the background (the engine thread).

        The first keystroke's suggestion then costs only its own tokens, and
        a buffer longer than the context gets its window before the first submit.
        """
        engine = self.engine
        if engine is None or not self.text.strip() or not self.suggest_enabled:
            return

        def warm() -> None:
            try:
                prompt = self._fit_window(self.text, lambda t: len(engine.tokenize(t)))
                for _ in engine.generate(prompt, GenerationOptions(max_tokens=0)):
                    pass
            except MtpError:
                pass  # e.g. one line longer than the context: the submit will say so

        self.worker.submit(warm)

    def _stops(self, prompt: str) -> list:
        from mtpcode.stops import code_stops

        if self.stop == "block":
            return code_stops(prompt, block=True)
        if isinstance(self.stop, int):
            return code_stops(prompt, lines=self.stop)
        return []

    def submit(self, typed: str) -> None:
        """Append ``typed`` to the session buffer and stream the model's continuation."""
        if self.engine is None:
            raise UsageError("no model loaded: choose one with /model NAME")
        joined = join_input(self.text, typed)
        if not joined.strip():
            self.info("nothing to continue yet: type some code")
            return
        self.suggester.cancel_pending()
        prompt = self._fit_window(joined, self._count_on_engine_thread)
        # The completion continues the last line of the buffer: put the cursor
        # back at its end on the screen, or show that line again.
        partial = joined.rsplit("\n", 1)[-1]
        on_screen = typed.rsplit("\n", 1)[-1] if typed else ""
        placed = self._cursor_after_input(on_screen)
        printer = StreamPrinter(
            self.lexer, joined[: len(joined) - len(partial)], self._write_tokens, gutter=GUTTER, at_line_start=True
        )
        if placed:
            printer.at_line_start = False
            printer.context += on_screen
            printer.feed(partial[len(on_screen) :])
        else:
            printer.feed(partial)
        try:
            done, shown = self._stream(prompt, printer)
        except BaseException:
            printer.finish()
            if placed or printer.text:
                self._print("")  # end the line before the error message
            raise
        printer.finish()
        completion = done.text if done.stop_reason != "interrupted" else shown
        self.undo_stack.append(self.text)
        self.text = joined + completion
        self.suggester.forget()
        self._record(done)
        # Start the stats line on a line of its own.
        tail = partial + completion
        if not tail.endswith("\n") and (tail or placed):
            self._print("")
        self._print(FormattedText([("class:stats", f"[{done.stats.summary()} · {done.stop_reason}]")]))

    def _cursor_after_input(self, last_line: str) -> bool:
        """Move the cursor from below the accepted input to the end of its last line.

        prompt-toolkit leaves the cursor at the start of the line after the
        input; a completion printed from there would not continue the code.
        Only done when the line surely did not wrap and has no tabs or
        control characters (whose width the terminal decides).
        """
        out = self.session.output
        width = len(GUTTER) + get_cwidth(last_line)
        if visible(last_line) != last_line or "\t" in last_line:
            return False
        try:
            columns = out.get_size().columns
        except Exception:  # an output that cannot tell its size: do not guess
            return False
        if width >= columns:
            return False
        out.cursor_up(1)
        out.cursor_forward(width)
        out.flush()
        return True

    def _stream(self, prompt: str, printer: StreamPrinter) -> tuple[Done, str]:
        """Generate on the engine thread, print pieces as they come; Ctrl-C cancels.

        Returns the Done event and the text shown. The queue is small, so the
        engine never runs far ahead of the screen and a Ctrl-C stops it soon.
        """
        events: queue.Queue = queue.Queue(maxsize=8)
        cancel = threading.Event()
        engine = self.engine
        options = self.settings.generation_options()
        stops = self._stops(prompt)

        def work() -> None:
            try:
                for event in engine.generate(prompt, options, stops=stops, cancel=cancel):
                    events.put(event)
            except BaseException as exc:  # handed to the UI thread, which re-raises it
                events.put(_Failed(exc))

        self.generating.set()
        future = self.worker.submit(work)
        shown: list[str] = []
        done: Done | None = None
        try:
            with _typeahead_kept(self.session.input):
                while done is None:
                    try:
                        event = events.get(timeout=0.1)
                        if isinstance(event, _Failed):
                            raise event.exc
                        if isinstance(event, Done):
                            done = event
                        elif isinstance(event, Piece) and not cancel.is_set():
                            shown.append(event.text)
                            printer.feed(event.text)
                    except queue.Empty:
                        continue
                    except KeyboardInterrupt:
                        cancel.set()  # keep draining until the engine says Done
        finally:
            self.generating.clear()
        future.result()
        if cancel.is_set() and done.stop_reason != "interrupted":
            done = dataclasses.replace(done, stop_reason="interrupted")
        return done, "".join(shown)

    def _record(self, done: Done) -> None:
        self.last_done = done
        t = self.totals
        t.completions += 1
        t.generated_tokens += done.stats.generated_tokens
        t.decode_s += done.stats.decode_s
        t.main_forwards += done.stats.main_forwards
        t.interrupted += done.stop_reason == "interrupted"

    # --- commands -----------------------------------------------------------------------

    def command(self, line: str) -> None:
        """Run a ``/command [args]`` line."""
        name, _, arg = line[1:].partition(" ")
        name = _ALIASES.get(name.lower(), name.lower())
        if name not in COMMANDS:
            raise UsageError(f"unknown command /{name}; /help lists the commands")
        getattr(self, f"cmd_{name}")(arg.strip())

    def cmd_help(self, arg: str) -> None:
        width = max(len(usage) for usage, _ in COMMANDS.values())
        lines = ["Commands:"]
        lines += [f"  {usage.ljust(width)}  {what}" for usage, what in COMMANDS.values()]
        lines += [
            "Settings for /set: " + ", ".join(_SET_KEYS),
            "Keys:",
            "  Enter        submit when the input is complete; inside brackets, after ':' or in a block: new line",
            "  Enter on an empty last line submits a block; an empty input continues the buffer",
            "  Alt-Enter    submit (also Esc then Enter)",
            "  Ctrl-J       new line",
            "  → or Ctrl-E  accept the suggestion (grey text); Alt-F accepts one word",
            "  Tab/Shift-Tab indent/dedent; ↑/↓ history",
            "  Ctrl-C       cancel a completion (or drop the input); Ctrl-D on an empty input quits",
        ]
        self._print("\n".join(lines))

    def cmd_quit(self, arg: str) -> None:
        self._quit = True

    def cmd_clear(self, arg: str) -> None:
        self.undo_stack.append(self.text)
        self._set_text("")
        self.info("session buffer cleared")

    def cmd_undo(self, arg: str) -> None:
        if not self.undo_stack:
            self.info("nothing to undo")
            return
        self._set_text(self.undo_stack.pop())
        self.info(f"undone; the buffer has {_count_lines(self.text)} lines")
        self.warm_up()

    def cmd_show(self, arg: str) -> None:
        if not self.text:
            self.info("the session buffer is empty")
            return
        self._print_code(self.text)
        if not self.text.endswith("\n"):
            self._print("")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise UsageError("usage: /save FILE")
        path = Path(arg).expanduser()
        if path.is_dir():
            raise OutputError(f"{path} is a directory; give a file name")
        atomic_write_text(path, self.text)
        self.info(f"saved {_count_lines(self.text)} lines ({len(self.text)} characters) to {path}")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise UsageError("usage: /load FILE")
        path = Path(arg).expanduser()
        data = read_file(path)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text") from None
        if "\0" in text:
            raise DataError(f"{path} looks binary (it contains NUL bytes)")
        self.undo_stack.append(self.text)
        self._set_text(text)
        lexer = lexer_for_filename(path.name)
        if lexer is not None:
            self.lexer = lexer
        self.info(f"loaded {path}: {_count_lines(text)} lines, {language_name(self.lexer)}")
        self.warm_up()

    def cmd_set(self, arg: str) -> None:
        if not arg:
            self._print("\n".join(f"  {k} = {v}" for k, v in self.current_settings().items()))
            return
        key, _, value = arg.partition(" ")
        key = key.lower().replace("-", "_")
        value = value.strip()
        if key not in _SET_KEYS:
            raise UsageError(f"unknown setting {key!r}; /set takes: {', '.join(_SET_KEYS)}")
        parse, ok, what = _SET_KEYS[key]
        if not value:
            raise UsageError(f"usage: /set {key} VALUE ({what})")
        try:
            parsed = parse(value)
            valid = ok(parsed)
        except ValueError:
            valid = False
        if not valid:
            raise UsageError(f"{key} must be {what}, not {value!r}")
        self.apply_setting(key, parsed)
        self.info(f"{key} = {self.current_settings()[key]}")

    def apply_setting(self, key: str, value: Any) -> None:
        """Set one /set key to an already parsed ``value``."""
        if key in _SETTINGS_KEYS:
            if key == "heads" and value is not None and self.engine is not None and value > self.engine.n_heads:
                raise UsageError(f"this model has {self.engine.n_heads} draft heads; heads must be at most that")
            self.settings = dataclasses.replace(self.settings, **{key: value})
        elif key == "suggest":
            self.suggest_enabled = value
            self.suggester.forget()
        elif key == "suggest_tokens":
            self.suggest_tokens = value
            self.suggester.forget()
        elif key == "stop":
            try:
                self.stop = parse_stop(value)
            except ValueError:
                raise UsageError(f"stop must be block, none or a number of lines, not {value!r}") from None
        elif key == "language":
            self.lexer = lexer_by_name(value)

    def current_settings(self) -> dict[str, str]:
        s = self.settings
        values: dict[str, Any] = {k: getattr(s, k) for k in _SETTINGS_KEYS}
        values["heads"] = "auto" if s.heads is None else s.heads
        values["seed"] = "random" if s.seed is None else s.seed
        values["adaptive"] = "on" if s.adaptive else "off"
        values["suggest"] = "on" if self.suggest_enabled else "off"
        values["suggest_tokens"] = self.suggest_tokens
        values["stop"] = describe_stop(self.stop)
        values["language"] = language_name(self.lexer)
        return {k: str(v) for k, v in values.items()}

    def cmd_model(self, arg: str) -> None:
        if not arg:
            where = f" ({self.model_path})" if self.model_path else ""
            self.info(f"model: {self.model_name or 'none'}{where}")
            return
        from mtpcode.models import resolve_model

        path = resolve_model(arg, self.settings)
        self.suggester.forget()
        self.info(f"loading {path} ...")
        engine = self._load_engine(path)
        if self._owns_engine and self.engine is not None:
            old = self.engine
            self.worker.call(old.close)
        self.engine, self._owns_engine = engine, True
        self.model_path = path
        self.model_name = path.name if Path(arg).expanduser().exists() else arg
        self._window_start = 0
        if self.settings.heads is not None and self.settings.heads > engine.n_heads:
            self.settings = dataclasses.replace(self.settings, heads=None)
        self.info(f"model {self.model_name}: {engine.n_heads} draft heads, context {engine.n_ctx} tokens")
        self.warm_up()

    def cmd_stats(self, arg: str) -> None:
        lines = []
        if self.last_done is None:
            lines.append("no completion yet")
        else:
            st = self.last_done.stats
            acc = ", ".join(
                f"head {k + 1}: {a}/{d}" for k, (a, d) in enumerate(zip(st.accepted_tokens, st.drafted_tokens))
            )
            lines += [
                f"last: {st.summary()}",
                f"  stop: {self.last_done.stop_reason}; prefill {st.prefill_s * 1000:.1f} ms, "
                f"decode {st.decode_s * 1000:.1f} ms ({st.python_s * 1000:.1f} ms in Python); "
                f"{st.main_forwards} main forwards",
                f"  drafts accepted: {acc or '-'}",
            ]
        t = self.totals
        tps = t.generated_tokens / t.decode_s if t.decode_s > 0 else 0.0
        tpf = t.generated_tokens / t.main_forwards if t.main_forwards else 0.0
        lines.append(
            f"session: {t.completions} completions ({t.interrupted} interrupted), {t.generated_tokens} tokens, "
            f"{tps:.1f} tok/s, {tpf:.2f} tok/forward"
        )
        g = self.suggester.stats
        lines.append(
            f"suggestions: {g.shown} shown ({g.cache_hits} from cache), {g.completed} computed "
            f"(mean {g.mean_ms:.1f} ms), {g.dropped} dropped as stale"
        )
        self._print("\n".join(lines))

    def _set_text(self, text: str) -> None:
        self.text = text
        self._window_start = 0
        self.suggester.forget()


@contextlib.contextmanager
def _typeahead_kept(inp: Any) -> Iterator[None]:
    """While a completion streams, keys typed on a terminal are neither echoed
    into the output nor lost: they wait for the next prompt. Ctrl-C still
    raises SIGINT (ISIG stays on). No-op for pipes and non-POSIX systems.
    """
    try:
        import termios

        fd = inp.fileno()
        if not os.isatty(fd):
            raise OSError
        saved = termios.tcgetattr(fd)
    except (ImportError, OSError, AttributeError, NotImplementedError, ValueError):
        yield
        return
    quiet = list(saved)
    quiet[3] = saved[3] & ~(termios.ECHO | termios.ICANON)  # lflags
    try:
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
        yield
    finally:
        try:
            termios.tcsetattr(fd, termios.TCSANOW, saved)
        except termios.error:
            pass


def _count_lines(text: str) -> int:
    return text.count("\n") + (1 if text and not text.endswith("\n") else 0)
