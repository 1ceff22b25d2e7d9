"""Ctrl-C (and SIGTERM) turned into a cancel: the one place that installs signal handlers.

Python runs a signal handler between two bytecodes of the main thread. A
``KeyboardInterrupt`` raised there can land anywhere: inside llama.cpp's eval
callback (where ctypes prints it and drops it), or between two statements of
a loop that was about to report what it did. So while something can be
cancelled cleanly, the signal calls a function instead (set a cancel event,
stop a job), and the work ends at its next check: between two forwards.

Only the main thread can install handlers; elsewhere :func:`on_signals` does
nothing and the default behaviour stays.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

Handler = Callable[[int, Any], None]


@contextlib.contextmanager
def on_signals(handler: Handler, signals: Sequence[signal.Signals] = (signal.SIGINT,), *,
               only_default: bool = False) -> Iterator[None]:
    """While active, ``signals`` call ``handler(signum, frame)``; the previous handlers come back
    afterwards. ``only_default``: leave a signal alone whose handler an application already
    replaced (a library must not take Ctrl-C from its caller)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in signals:
        current = signal.getsignal(sig)
        if only_default and current not in (signal.default_int_handler, signal.SIG_DFL):
            continue
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            if old is None:  # installed from C: put Python's default back
                old = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, old)


@contextlib.contextmanager
def ctrl_c_cancels(cancel: Callable[[], None], *, twice_raises: bool = True) -> Iterator[None]:
    """While active, Ctrl-C calls ``cancel()`` instead of raising KeyboardInterrupt; with
    ``twice_raises`` a second Ctrl-C raises it (for a user whose cancel does not end the work)."""
    pressed = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if pressed.is_set() and twice_raises:
            raise KeyboardInterrupt
        pressed.set()
        cancel()

    with on_signals(handler):
        yield
