"""Editing rules of the REPL's input box: which pygments lexer, when Enter
submits, how deep a new line is indented, and the key bindings that use them.

The rules are plain functions of the text so they can be tested without a
terminal; :func:`editing_key_bindings` wires them to prompt-toolkit.

Enter submits when the input is *complete* and inserts a new line otherwise
(see :func:`enter_submits`); Alt-Enter / Esc Enter always submits; Ctrl-J
always inserts a new line.
"""

from __future__ import annotations

import io
import re
import tokenize
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pygments.lexers import get_lexer_by_name, get_lexer_for_filename
from pygments.token import Comment, String
from pygments.util import ClassNotFound

from mtpcode.errors import UsageError

if TYPE_CHECKING:
    from prompt_toolkit.key_binding import KeyBindings
    from pygments.lexer import Lexer

INDENT = "    "
_OPEN = "([{"
_CLOSE = ")]}"
# A line starting with one of these ends the block it is in: the next line dedents.
_DEDENT_AFTER = re.compile(r"^\s*(return|pass|break|continue|raise)\b")
# "/word ..." is a REPL command; "//" (a C comment) or "/*" is code.
_COMMAND = re.compile(r"^/[A-Za-z]")


# --- lexers -------------------------------------------------------------------------


def lexer_by_name(name: str) -> Lexer:
    """The pygments lexer for a language name or alias (``python``, ``c``, ``rust``, ...).

    UsageError for a name pygments does not know.
    """
    try:
        return _raw(get_lexer_by_name(name))
    except ClassNotFound:
        raise UsageError(
            f"unknown language {name!r}: pygments has no lexer by that name (try python, c, cpp, rust, go, javascript)"
        ) from None


def lexer_for_filename(filename: str) -> Lexer | None:
    """The pygments lexer for a file name's extension, or None if pygments knows none."""
    try:
        return _raw(get_lexer_for_filename(filename))
    except ClassNotFound:
        return None


def _raw(lexer: Lexer) -> Lexer:
    # Lex text exactly as it is: by default pygments strips leading/trailing
    # newlines and appends one, which would shift every offset we compute.
    return type(lexer)(stripnl=False, stripall=False, ensurenl=False)


def language_name(lexer: Lexer) -> str:
    """A short lower-case name for ``lexer`` (its first alias)."""
    return (lexer.aliases[0] if lexer.aliases else lexer.name).lower()


def is_python(lexer: Lexer) -> bool:
    return any(a in ("python", "python3", "py", "py3") for a in lexer.aliases)


# --- the state of an input --------------------------------------------------------------


@dataclass(frozen=True)
class OpenState:
    """What is still open at the end of some code."""

    brackets: int  # unclosed ( [ { outside strings and comments
    in_string: bool  # inside an unterminated multi-line string (Python only)


def open_state(text: str, lexer: Lexer) -> OpenState:
    """Count unclosed brackets in ``text`` (strings and comments ignored)."""
    depth = 0
    # Some lexers only recognise a line comment by its newline: give it one.
    for _, ttype, value in lexer.get_tokens_unprocessed(text + "\n"):
        if ttype in String or ttype in Comment:
            continue
        for ch in value:
            if ch in _OPEN:
                depth += 1
            elif ch in _CLOSE and depth > 0:
                depth -= 1
    return OpenState(brackets=depth, in_string=is_python(lexer) and _python_open_string(text))


def _python_open_string(text: str) -> bool:
    try:
        for _ in tokenize.generate_tokens(io.StringIO(text).readline):
            pass
    except tokenize.TokenError as exc:
        return "string" in str(exc.args[0])
    except (SyntaxError, ValueError):
        # Partial code is often not valid Python; that is not an open string.
        return False
    return False


def is_command(text: str) -> bool:
    """True if ``text`` is a REPL command (``/help``), not code."""
    return bool(_COMMAND.match(text.lstrip()))


def enter_submits(text: str, cursor: int, lexer: Lexer) -> bool:
    """Whether Enter submits ``text`` (True) or inserts a new line (False).

    Enter inserts a new line when the cursor is not at the end, inside open
    brackets or a multi-line string, after a line ending with ``:`` or ``\\``,
    and in a multi-line input whose last line has text (you are writing a
    block: an empty last line submits it). Otherwise it submits; a command
    (``/help``) always submits.
    """
    if is_command(text):
        return True
    if cursor < len(text):
        return False
    last = text.rsplit("\n", 1)[-1]
    if last.rstrip().endswith((":", "\\")):
        return False
    state = open_state(text, lexer)
    if state.brackets or state.in_string:
        return False
    return "\n" not in text or not last.strip()


def newline_indent(line_before_cursor: str, lexer: Lexer) -> str:
    """The indentation for a new line opened after ``line_before_cursor``.

    The line's own indentation, one level deeper after a line ending with
    ``:`` or an opening bracket, one level shallower after ``return``,
    ``pass``, ``break``, ``continue`` or ``raise`` (Python).
    """
    indent = line_before_cursor[: len(line_before_cursor) - len(line_before_cursor.lstrip(" \t"))]
    unit = "\t" if indent.startswith("\t") else INDENT
    code = line_before_cursor.rstrip()
    if code.endswith(":") or (code and code[-1] in _OPEN):
        return indent + unit
    if is_python(lexer) and _DEDENT_AFTER.match(code):
        return indent[: -len(unit)] if indent.endswith(unit) else indent
    return indent


# --- key bindings ---------------------------------------------------------------------


def editing_key_bindings(get_lexer) -> KeyBindings:
    """Enter / Alt-Enter / Ctrl-J / Tab / Shift-Tab / Backspace for the REPL's input.

    ``get_lexer`` returns the current pygments lexer (it changes with /load).
    """
    # (prompt_toolkit only here: the session's rules, above, are used without a terminal)
    from prompt_toolkit.filters import has_selection
    from prompt_toolkit.key_binding import KeyBindings

    kb = KeyBindings()

    def newline(buffer) -> None:
        before = buffer.document.current_line_before_cursor
        buffer.insert_text("\n" + newline_indent(before, get_lexer()))

    @kb.add("enter", filter=~has_selection)
    def _enter(event) -> None:
        buffer = event.current_buffer
        if enter_submits(buffer.text, buffer.cursor_position, get_lexer()):
            buffer.validate_and_handle()
        else:
            newline(buffer)

    @kb.add("escape", "enter")
    def _submit(event) -> None:
        event.current_buffer.validate_and_handle()

    @kb.add("c-j")
    def _newline(event) -> None:
        newline(event.current_buffer)

    @kb.add("tab", filter=~has_selection)
    def _indent(event) -> None:
        buffer = event.current_buffer
        col = buffer.document.cursor_position_col
        buffer.insert_text(" " * (len(INDENT) - col % len(INDENT)))

    def dedent_leading(buffer) -> bool:
        """In a line's leading spaces, go back one indentation level; False elsewhere."""
        before = buffer.document.current_line_before_cursor
        if before and not before.strip(" "):
            buffer.delete_before_cursor((len(before) - 1) % len(INDENT) + 1)
            return True
        return False

    @kb.add("s-tab", filter=~has_selection)
    def _dedent(event) -> None:
        dedent_leading(event.current_buffer)

    @kb.add("backspace", filter=~has_selection)
    def _backspace(event) -> None:
        # In leading spaces, go back one indentation level; else one character.
        if not dedent_leading(event.current_buffer):
            event.current_buffer.delete_before_cursor(1)

    return kb
