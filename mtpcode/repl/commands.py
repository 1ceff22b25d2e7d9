"""The REPL's ``/commands``: the table that ``/help`` prints and their handlers.

A handler is a function of the running REPL and the text after the command's
name. It changes the session through the REPL's
:class:`~mtpcode.repl.session.SessionBuffer` and reports through the REPL's
output; a bad argument is an :class:`~mtpcode.errors.MtpError`, which the REPL
prints as one ``error:`` line before it goes on.

The REPL is seen through :class:`Host`, the little the commands need of it, so
that this module does not depend on the terminal UI: :mod:`mtpcode.repl.ui`
imports the command table, and its ``Repl`` is the one ``Host``.

``/set`` changes the model's settings through :mod:`mtpcode.config`, which
parses and checks them as it does for the config file, flags and ``serve``
requests; only the REPL's own keys (suggestions, stop, language) are parsed here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mtpcode.config import check_setting, override_settings, parse_bool
from mtpcode.errors import DataError, OutputError, UsageError
from mtpcode.files import atomic_write_text, read_file
from mtpcode.models import resolve_model
from mtpcode.repl.edit import language_name, lexer_by_name, lexer_for_filename
from mtpcode.repl.session import SessionBuffer, count_lines, describe_stop, parse_stop

if TYPE_CHECKING:
    from pygments.lexer import Lexer

    from mtpcode.repl.suggest import ModelSuggest
    from mtpcode.runtime import Engine

# The settings of mtpcode.config that /set changes (the rest are fixed once the model is loaded).
MODEL_SETTINGS = ("temperature", "top_k", "top_p", "min_p", "max_tokens", "heads", "seed", "adaptive")
# /set keys of the REPL itself, with what a valid value is.
SESSION_SETTINGS = {
    "suggest": "on or off",
    "suggest_tokens": "an integer from 1 to 256",
    "stop": "block, none, or a number of lines",
    "language": "a pygments language name (python, c, rust, ...)",
}
SET_KEYS = MODEL_SETTINGS + tuple(SESSION_SETTINGS)
MAX_SUGGEST_TOKENS = 256


class Host(Protocol):
    """What a command uses of the REPL that runs it."""

    buffer: SessionBuffer
    suggester: ModelSuggest
    lexer: Lexer  # the session's language
    model_path: Path | None
    model_name: str | None

    def print(self, text: Any, end: str = "\n") -> None:
        """Print ``text`` (a string or prompt-toolkit formatted text) above the input box."""
        ...

    def info(self, message: str) -> None: ...

    def print_code(self, text: str, context: str = "") -> None:
        """Print ``text`` highlighted in the session's language."""
        ...

    def quit(self) -> None:
        """Leave the loop once the current input is handled."""
        ...

    def warm_up(self) -> None:
        """Prefill the session buffer in the background."""
        ...

    def load_engine(self, path: Path) -> Engine:
        """Load the bundle at ``path`` with the session's settings."""
        ...

    def use_engine(self, engine: Engine, path: Path, name: str) -> None:
        """Continue with ``engine`` (the session now owns it; the one it loaded before is closed)."""
        ...


@dataclass(frozen=True)
class Command:
    """One ``/command``: how it is used, what it does (for /help) and its handler."""

    usage: str
    what: str
    run: Callable[[Host, str], None]


def run_command(ui: Host, line: str) -> None:
    """Run a ``/command [args]`` line."""
    name, _, arg = line[1:].partition(" ")
    name = ALIASES.get(name.lower(), name.lower())
    if name not in COMMANDS:
        raise UsageError(f"unknown command /{name}; /help lists the commands")
    COMMANDS[name].run(ui, arg.strip())


# --- the handlers ---------------------------------------------------------------------


def cmd_help(ui: Host, arg: str) -> None:
    width = max(len(c.usage) for c in COMMANDS.values())
    lines = ["Commands:"]
    lines += [f"  {c.usage.ljust(width)}  {c.what}" for c in COMMANDS.values()]
    lines += [
        "Settings for /set: " + ", ".join(SET_KEYS),
        "Keys:",
        "  Enter        submit when the input is complete; inside brackets, after ':' or in a block: new line",
        "  Enter on an empty last line submits a block; an empty input continues the buffer",
        "  Alt-Enter    submit (also Esc then Enter)",
        "  Ctrl-J       new line",
        "  → or Ctrl-E  accept the suggestion (grey text); Alt-F accepts one word",
        "  Tab/Shift-Tab indent/dedent; ↑/↓ history",
        "  Ctrl-C       cancel a completion (or drop the input); Ctrl-D on an empty input quits",
    ]
    ui.print("\n".join(lines))


def cmd_quit(ui: Host, arg: str) -> None:
    ui.quit()


def cmd_clear(ui: Host, arg: str) -> None:
    ui.buffer.replace("")
    ui.info("session buffer cleared")


def cmd_undo(ui: Host, arg: str) -> None:
    if not ui.buffer.undo():
        ui.info("nothing to undo")
        return
    ui.info(f"undone; the buffer has {ui.buffer.lines} lines")
    ui.warm_up()


def cmd_show(ui: Host, arg: str) -> None:
    text = ui.buffer.text
    if not text:
        ui.info("the session buffer is empty")
        return
    ui.print_code(text)
    if not text.endswith("\n"):
        ui.print("")


def cmd_save(ui: Host, arg: str) -> None:
    if not arg:
        raise UsageError("usage: /save FILE")
    path = Path(arg).expanduser()
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name")
    # Like an editor's save: a mistyped directory is an error, not a new directory tree.
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {path}: no such directory {path.parent}")
    text = ui.buffer.text
    atomic_write_text(path, text)
    ui.info(f"saved {count_lines(text)} lines ({len(text)} characters) to {path}")


def cmd_load(ui: Host, arg: str) -> None:
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
    ui.buffer.replace(text)
    lexer = lexer_for_filename(path.name)
    if lexer is not None:
        ui.lexer = lexer
    ui.info(f"loaded {path}: {count_lines(text)} lines, {language_name(ui.lexer)}")
    ui.warm_up()


def cmd_set(ui: Host, arg: str) -> None:
    if not arg:
        ui.print("\n".join(f"  {k} = {v}" for k, v in current_settings(ui).items()))
        return
    key, _, value = arg.partition(" ")
    key = key.lower().replace("-", "_")
    value = value.strip()
    if key not in SET_KEYS:
        raise UsageError(f"unknown setting {key!r}; /set takes: {', '.join(SET_KEYS)}")
    if not value:
        what = f" ({SESSION_SETTINGS[key]})" if key in SESSION_SETTINGS else f" (now {current_settings(ui)[key]})"
        raise UsageError(f"usage: /set {key} VALUE{what}")
    set_value(ui, key, value)
    ui.info(f"{key} = {current_settings(ui)[key]}")


def set_value(ui: Host, key: str, text: str) -> None:
    """Set one /set key from its text as typed; UsageError naming the rule for a bad value."""
    buffer = ui.buffer
    if key in MODEL_SETTINGS:
        if key == "seed" and text.lower() == "random":
            text = "none"  # /set shows "no seed" as random: take that back too
        check_setting(key, text)  # the message names the key and its rule
        settings = override_settings(buffer.settings, "/set", **{key: text})
        engine = buffer.engine
        if key == "heads" and settings.heads is not None and engine is not None and settings.heads > engine.n_heads:
            raise UsageError(f"this model has {engine.n_heads} draft heads; heads must be at most that")
        buffer.settings = settings
    elif key == "suggest":
        buffer.suggest_enabled = _parse(key, text, parse_bool)
        ui.suggester.forget()
    elif key == "suggest_tokens":
        tokens = _parse(key, text, int)
        if not 1 <= tokens <= MAX_SUGGEST_TOKENS:
            raise UsageError(f"suggest_tokens must be {SESSION_SETTINGS[key]}, not {text!r}")
        buffer.suggest_tokens = tokens
        ui.suggester.forget()
    elif key == "stop":
        buffer.stop = _parse(key, text, parse_stop)
    elif key == "language":
        ui.lexer = lexer_by_name(text)
    else:
        raise UsageError(f"unknown setting {key!r}; /set takes: {', '.join(SET_KEYS)}")


def _parse(key: str, text: str, parse: Callable[[str], Any]) -> Any:
    try:
        return parse(text)
    except ValueError:
        raise UsageError(f"{key} must be {SESSION_SETTINGS[key]}, not {text!r}") from None


def current_settings(ui: Host) -> dict[str, str]:
    """Every /set key with its value, as /set shows them."""
    buffer = ui.buffer
    s = buffer.settings
    values: dict[str, Any] = {k: getattr(s, k) for k in MODEL_SETTINGS}
    values["heads"] = "auto" if s.heads is None else s.heads
    values["seed"] = "random" if s.seed is None else s.seed
    values["adaptive"] = "on" if s.adaptive else "off"
    values["suggest"] = "on" if buffer.suggest_enabled else "off"
    values["suggest_tokens"] = buffer.suggest_tokens
    values["stop"] = describe_stop(buffer.stop)
    values["language"] = language_name(ui.lexer)
    return {k: str(v) for k, v in values.items()}


def cmd_model(ui: Host, arg: str) -> None:
    if not arg:
        where = f" ({ui.model_path})" if ui.model_path else ""
        ui.info(f"model: {ui.model_name or 'none'}{where}")
        return
    buffer = ui.buffer
    path = resolve_model(arg, buffer.settings)
    ui.suggester.forget()
    ui.info(f"loading {path} ...")
    engine = ui.load_engine(path)
    ui.use_engine(engine, path, path.name if Path(arg).expanduser().exists() else arg)
    if buffer.settings.heads is not None and buffer.settings.heads > engine.n_heads:
        buffer.settings = override_settings(buffer.settings, "/model", heads="auto")
    ui.info(f"model {ui.model_name}: {engine.n_heads} draft heads, context {engine.n_ctx} tokens")
    ui.warm_up()


def cmd_stats(ui: Host, arg: str) -> None:
    buffer = ui.buffer
    lines = []
    if buffer.last_done is None:
        lines.append("no completion yet")
    else:
        st = buffer.last_done.stats
        acc = ", ".join(
            f"head {k + 1}: {a}/{d}" for k, (a, d) in enumerate(zip(st.accepted_tokens, st.drafted_tokens))
        )
        lines += [
            f"last: {st.summary()}",
            f"  stop: {buffer.last_done.stop_reason}; prefill {st.prefill_s * 1000:.1f} ms, "
            f"decode {st.decode_s * 1000:.1f} ms ({st.python_s * 1000:.1f} ms in Python); "
            f"{st.main_forwards} main forwards",
            f"  drafts accepted: {acc or '-'}",
        ]
    t = buffer.totals
    tps = t.generated_tokens / t.decode_s if t.decode_s > 0 else 0.0
    tpf = t.generated_tokens / t.main_forwards if t.main_forwards else 0.0
    lines.append(
        f"session: {t.completions} completions ({t.interrupted} interrupted), {t.generated_tokens} tokens, "
        f"{tps:.1f} tok/s, {tpf:.2f} tok/forward"
    )
    g = ui.suggester.stats
    lines.append(
        f"suggestions: {g.shown} shown ({g.cache_hits} from cache), {g.completed} computed "
        f"(mean {g.mean_ms:.1f} ms), {g.dropped} dropped as stale"
    )
    ui.print("\n".join(lines))


COMMANDS: dict[str, Command] = {
    "help": Command("/help", "show commands and keys", cmd_help),
    "load": Command(
        "/load FILE", "replace the session buffer with FILE (its extension picks the highlighting)", cmd_load
    ),
    "save": Command("/save FILE", "write the session buffer to FILE (atomically: temporary file + rename)", cmd_save),
    "show": Command("/show", "print the session buffer", cmd_show),
    "clear": Command("/clear", "empty the session buffer", cmd_clear),
    "undo": Command("/undo", "take back the last submission and its completion", cmd_undo),
    "set": Command(
        "/set [KEY VALUE]", "change a setting; without arguments list the settings and their values", cmd_set
    ),
    "model": Command("/model [NAME]", "switch to another model (a registered name or a bundle directory)", cmd_model),
    "stats": Command("/stats", "numbers of the last completion and of the whole session", cmd_stats),
    "quit": Command("/quit", "leave the REPL (also /exit or Ctrl-D)", cmd_quit),
}
ALIASES = {"exit": "quit", "q": "quit", "h": "help", "?": "help"}
