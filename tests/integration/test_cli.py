"""The error boundary of the ``mtpcode`` command line, in real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys


def test_closed_stdout_pipe_exits_quietly():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        proc = subprocess.run([sys.executable, "-m", "mtpcode", "config", "show"], stdout=write_end,
                              stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write_end)
    assert proc.returncode == 0
    assert proc.stderr == b""


def test_errors_are_one_line_with_their_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mtpcode", "models", "show", "no-such-model"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 69
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("mtpcode: error: ")


def test_usage_errors_exit_2():
    proc = subprocess.run([sys.executable, "-m", "mtpcode", "convert"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
