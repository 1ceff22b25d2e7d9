"""The REPL's UI: a prompt-toolkit session around a session buffer and an Engine.

The session keeps one growing text, the *session buffer* (a scratch file,
:class:`~mtpcode.repl.session.SessionBuffer`). Submitting input appends it to
the buffer (on a new line) and asks the model to continue; the completion
streams onto the screen, highlighted, is followed by one stats line, and joins
the buffer. An empty submit continues the buffer as it is. Lines starting with
``/`` are commands (:mod:`mtpcode.repl.commands`, see ``/help``).

This module is the terminal side: the input box, printing, streaming a
completion, the toolbar, and the lifetime of the Engine. Input and output are
injectable (prompt-toolkit ``Input``/``Output``), so tests drive a real session
through a pipe; the Engine is used only from the scheduler's worker thread
(:mod:`mtpcode.scheduler`): suggestions, completions and token counts are its jobs.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prompt_toolkit import PromptSession, print_formatted_text
from prompt_toolkit.formatted_text import FormattedText, PygmentsTokens
from prompt_toolkit.history import FileHistory, InMemoryHistory
from prompt_toolkit.lexers import DynamicLexer, PygmentsLexer
from prompt_toolkit.styles import Style, merge_styles, style_from_pygments_cls
from prompt_toolkit.utils import get_cwidth
from pygments.styles import get_style_by_name
from pygments.token import Token
from pygments.util import ClassNotFound

from mtpcode.config import Settings
from mtpcode.errors import MtpError, UsageError
from mtpcode.generation import Done, GenerationOptions, Piece, Stats
from mtpcode.repl.commands import run_command
from mtpcode.repl.edit import editing_key_bindings, is_command, language_name, lexer_by_name
from mtpcode.repl.session import SessionBuffer, SessionTotals, StopMode, describe_stop
from mtpcode.repl.suggest import ModelSuggest
from mtpcode.scheduler import Event, Job, Outcome, Scheduler
from mtpcode.signals import ctrl_c_cancels
from mtpcode.stops import StopReason

if TYPE_CHECKING:
    from prompt_toolkit.input import Input
    from prompt_toolkit.output import Output
    from pygments.lexer import Lexer

    from mtpcode.runtime import Engine

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


class Repl:
    """One REPL session.

    ``engine`` is used as given (the caller closes it); otherwise the Engine
    for ``model_path`` is loaded by :meth:`run` and closed at the end. With
    neither, the session starts without a model (``/model NAME`` loads one).

    The session's state is :attr:`buffer` (a :class:`SessionBuffer`); the
    properties below (``text``, ``settings``, ``engine``, ...) read it through.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        model_path: Path | None = None,
        engine: Engine | None = None,
        model_name: str | None = None,
        language: str | None = None,
        stop: StopMode = "block",
        suggest: bool = True,
        suggest_tokens: int = 16,
        style: str = "default",
        history: Path | None = None,
        input: Input | None = None,
        output: Output | None = None,
    ) -> None:
        self.buffer = SessionBuffer(settings, engine, stop=stop, suggest=suggest, suggest_tokens=suggest_tokens)
        self.model_path = model_path
        if model_name is None and model_path is None and engine is not None:
            model_name = engine.bundle.path.name
        self.model_name = model_name or (model_path.name if model_path else None)
        self._owns_engine = False
        self.lexer = lexer_by_name(language or "python")
        self.generating = threading.Event()  # set while a completion streams
        self._quit = False
        self.scheduler: Scheduler | None = None  # the engine's worker (mtpcode.scheduler), once there is one
        self.suggester = ModelSuggest(self.buffer, lambda: self.scheduler)
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

    # --- the session's state, read through ------------------------------------------------

    @property
    def engine(self) -> Engine | None:
        """The model the session continues with (None: no model loaded)."""
        return self.buffer.engine

    @property
    def settings(self) -> Settings:
        """Sampling and drafting settings of completions (``/set`` changes them)."""
        return self.buffer.settings

    @property
    def text(self) -> str:
        """The session buffer's text."""
        return self.buffer.text

    @property
    def stop(self) -> StopMode:
        return self.buffer.stop

    @property
    def suggest_enabled(self) -> bool:
        return self.buffer.suggest_enabled

    @property
    def totals(self) -> SessionTotals:
        return self.buffer.totals

    @property
    def last_done(self) -> Done | None:
        return self.buffer.last_done

    # --- setup --------------------------------------------------------------------------

    @staticmethod
    def _make_style(name: str) -> Any:
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

    def load_engine(self, path: Path) -> Engine:
        """Load the Engine for bundle ``path`` with this session's settings."""
        from mtpcode.runtime import Engine  # (llama.cpp: loaded with the first model, not at start-up)

        return Engine(path, **self.settings.engine_kwargs())

    def use_engine(self, engine: Engine, path: Path, name: str) -> None:
        """Continue with ``engine`` (loaded from ``path``, shown as ``name``), which the session now owns;
        an Engine the session loaded before is closed."""
        self._close_engine()
        self.buffer.set_engine(engine)
        self.scheduler = Scheduler(engine)
        self._owns_engine = True
        self.model_path = path
        self.model_name = name

    def open(self) -> None:
        """Load the model if one was named and none was given; start its scheduler."""
        if self.engine is None and self.model_path is not None:
            self.info(f"loading {self.model_path} ...")
            self.buffer.engine = self.load_engine(self.model_path)
            self._owns_engine = True
        engine, heads = self.engine, self.settings.heads
        if engine is not None and self.scheduler is None:
            self.scheduler = Scheduler(engine)
        if engine is not None and heads is not None and heads > engine.n_heads:
            raise UsageError(
                f"--heads {heads}: the model has {engine.n_heads} draft heads; use --heads 0..{engine.n_heads}"
            )

    def close(self) -> None:
        """Stop suggestions, finish engine work, close an Engine this session loaded."""
        self.suggester.forget()
        self._close_engine()

    def _close_engine(self) -> None:
        stopped = True
        if self.scheduler is not None:
            stopped = self.scheduler.close()
            self.scheduler = None
        engine = self.engine
        if self._owns_engine and engine is not None and stopped:  # (never under a step still running)
            engine.close()
            self.buffer.engine = None
        self._owns_engine = False

    def quit(self) -> None:
        """Leave the loop once the current input is handled."""
        self._quit = True

    # --- output -------------------------------------------------------------------------

    def print(self, text: Any, end: str = "\n") -> None:
        """Print ``text`` (a string or prompt-toolkit formatted text) above the input box."""
        print_formatted_text(
            text, end=end, style=self.style, output=self.session.output, include_default_pygments_style=False
        )

    def info(self, message: str) -> None:
        self.print(FormattedText([("class:info", message)]))

    def error(self, message: str) -> None:
        self.print(FormattedText([("class:error", "error: " + message)]))

    def print_code(self, text: str, context: str = "") -> None:
        """Print ``text`` highlighted in the session's language, lexed after ``context``."""
        printer = StreamPrinter(self.lexer, context, self._write_tokens)
        printer.feed(text)
        printer.finish()

    def _write_tokens(self, fragments: list[tuple[Any, str]]) -> None:
        self.print(PygmentsTokens([(t, visible(v)) for t, v in fragments]), end="")

    def _toolbar(self) -> FormattedText:
        engine = self.engine
        model = f"{self.model_name} ({engine.n_heads} heads)" if engine is not None else "no model"
        suggest = "on" if self.suggest_enabled else "off"
        if self.suggest_enabled and self.suggester.busy:
            suggest += " …"
        s = self.settings
        status = (
            f" {model} · {language_name(self.lexer)} · suggest {suggest} · temp {s.temperature:g} · "
            f"max {s.max_tokens} · stop {describe_stop(self.stop)} · buffer {self.buffer.lines} lines"
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
                run_command(self, text.strip())
            else:
                self.submit(text)
        except KeyboardInterrupt:
            self.info("cancelled")
        except MtpError as exc:
            self.error(str(exc))

    # --- completions --------------------------------------------------------------------

    def _count_on_engine_thread(self, text: str) -> int:
        engine, sched = self.engine, self.scheduler
        assert engine is not None and sched is not None
        return sched.call(lambda: len(engine.tokenize(text)))

    def warm_up(self) -> None:
        """Prefill the session buffer in the background (a cache warm-up job on the scheduler).

        The first keystroke's suggestion then costs only its own tokens, and
        a buffer longer than the context gets its window before the first submit.
        """
        engine, sched = self.engine, self.scheduler
        if engine is None or sched is None or not self.text.strip() or not self.suggest_enabled:
            return
        buffer = self.buffer

        def prepare() -> tuple[str, tuple[()], None]:  # on the worker thread, where tokenizing is safe
            return buffer.fit_window(buffer.text, lambda t: len(engine.tokenize(t))), (), None

        # (a failure, e.g. one line longer than the context, is the submit's to report)
        sched.submit(Job(options=GenerationOptions(max_tokens=0), prepare=prepare, background=True, pieces=False))

    def submit(self, typed: str) -> None:
        """Append ``typed`` to the session buffer and stream the model's continuation."""
        if self.engine is None:
            raise UsageError("no model loaded: choose one with /model NAME")
        joined = self.buffer.joined(typed)
        if not joined.strip():
            self.info("nothing to continue yet: type some code")
            return
        self.suggester.cancel_pending()
        prompt = self.buffer.fit_window(joined, self._count_on_engine_thread)
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
                self.print("")  # end the line before the error message
            raise
        printer.finish()
        completion = done.text if done.stop_reason != "interrupted" else shown
        self.buffer.commit(joined, completion, done)
        # Start the stats line on a line of its own.
        tail = partial + completion
        if not tail.endswith("\n") and (tail or placed):
            self.print("")
        self.print(FormattedText([("class:stats", f"[{done.stats.summary()} · {done.stop_reason}]")]))

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
        """Generate on the engine's worker, print pieces as they come; Ctrl-C cancels.

        Returns the Done event and the text shown.
        """
        events: queue.Queue[Event] = queue.Queue()
        sched = self.scheduler
        assert sched is not None  # submit checked
        job = Job(prompt=prompt, options=self.buffer.completion_options(), stops=self.buffer.stops(prompt),
                  sink=events.put)
        self.generating.set()
        shown: list[str] = []
        outcome: Outcome | None = None
        try:
            with _typeahead_kept(self.session.input), ctrl_c_cancels(lambda: sched.abandon(job, "interrupted"),
                                                                     twice_raises=False):
                sched.submit(job)
                while outcome is None:
                    try:
                        event = events.get(timeout=0.1)
                        if isinstance(event, Outcome):
                            outcome = event
                        elif isinstance(event, Piece) and not job.cancel.is_set():
                            shown.append(event.text)
                            printer.feed(event.text)
                    except queue.Empty:
                        continue
                    except KeyboardInterrupt:  # (off the main thread, where Ctrl-C cannot be a cancel)
                        sched.abandon(job, "interrupted")  # keep draining until the job ends
        finally:
            self.generating.clear()
        if outcome.error is not None:
            raise outcome.error
        reason = StopReason.INTERRUPTED if job.cancel.is_set() else outcome.stop_reason
        return Done(text=outcome.text, stop_reason=reason, stats=outcome.stats or Stats()), "".join(shown)


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
