"""A real `mtpcode serve --http` process for the HTTP tests, small SSE helpers, and the request
bodies editor plugins send (copied from their sources)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 120.0


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


class HttpServer:
    """`mtpcode serve --http --port 0 ...` in a subprocess; ``url`` once it answers /health with 200."""

    def __init__(self, *args: str, bundle: Path | None = None, extra_env: dict[str, str] | None = None,
                 wait_ready: bool = True) -> None:
        cmd = [sys.executable, "-m", "mtpcode", "serve", "--http", "--port", "0", "--threads", "2"]
        if bundle is not None:
            cmd += ["-m", str(bundle)]
        extra_env = dict(extra_env or {})
        # a home of its own: what the drafting policy learns stays out of the user's cache
        self._home = tempfile.TemporaryDirectory(prefix="mtpcode-server-home-")
        extra_env.setdefault("MTPCODE_HOME", self._home.name)
        self.proc = subprocess.Popen([*cmd, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=env(**extra_env), text=True)
        self.stderr: list[str] = []
        self.url = ""
        self._port_seen = threading.Event()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        if not self._port_seen.wait(START_TIMEOUT):
            self.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.stderr))
        if not self.url:
            code = self.proc.wait(timeout=30)
            raise RuntimeError(f"server exited with {code}:\n" + "".join(self.stderr))
        if wait_ready:
            self.wait_ready()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            m = re.search(r"listening on (http://\S+?:\d+)", line)
            if m and not self.url:
                self.url = m.group(1)
                self._port_seen.set()
        self._port_seen.set()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "".join(self.stderr))
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server never became ready:\n" + "".join(self.stderr))

    def post(self, path: str, body: Any, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=kw.pop("timeout", 120), **kw)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in self.get("/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def rss_kib(self) -> int:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", text).group(1))  # type: ignore[union-attr]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send ``sig`` and wait: the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._home.cleanup()


def sse_events(raw: bytes) -> list[Any]:
    """The ``data: ...`` events of a server-sent-events body, JSON-decoded (``[DONE]`` kept as the string).

    Checks the framing: every event is one ``data: `` line followed by a blank line.
    """
    text = raw.decode("utf-8")
    assert text.endswith("\n\n"), text[-80:]
    events = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# --- plugins' own request bodies ------------------------------------------------------------------


def llama_vim_fim_request(prefix: str, middle: str, suffix: str, extra: list[dict], indent: int) -> dict:
    """llama.vim's FIM request (autoload/llama.vim, llama#fim), with its default settings."""
    return {
        "id_slot": 0,
        "input_prefix": prefix,
        "input_suffix": suffix,
        "input_extra": extra,
        "prompt": middle,
        "n_predict": 128,
        "stop": [],
        "n_indent": indent,
        "top_k": 40,
        "top_p": 0.90,
        "samplers": ["top_k", "top_p", "infill"],
        "stream": False,
        "cache_prompt": True,
        "t_max_prompt_ms": 500,
        "t_max_predict_ms": 250,
        "response_fields": [
            "content",
            "timings/prompt_n",
            "timings/prompt_ms",
            "timings/prompt_per_token_ms",
            "timings/prompt_per_second",
            "timings/predicted_n",
            "timings/predicted_ms",
            "timings/predicted_per_token_ms",
            "timings/predicted_per_second",
            "truncated",
            "tokens_cached",
        ],
        "model": "",
    }


def llama_vim_ring_request(extra: list[dict]) -> dict:
    """llama.vim's background extra-context update (s:ring_update): n_predict 0, only fills the cache."""
    return {
        "id_slot": 0,
        "input_prefix": "",
        "input_suffix": "",
        "input_extra": extra,
        "prompt": "",
        "n_predict": 0,
        "temperature": 0.0,
        "samplers": [],
        "stream": False,
        "cache_prompt": True,
        "t_max_prompt_ms": 1,
        "t_max_predict_ms": 1,
        "response_fields": [""],
        "model": "",
    }


def llama_vscode_request(prefix: str, suffix: str, chunks: list[dict], prompt: str, nindent: int,
                         no_predict: bool = False) -> dict:
    """llama.vscode's FIM request (src/llama-server.ts, createRequestPayload), with its defaults."""
    if no_predict:
        return {"id_slot": 0, "input_prefix": prefix, "input_suffix": suffix, "input_extra": chunks,
                "prompt": prompt, "n_predict": 0, "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 500,
                "t_max_predict_ms": 1}
    return {"id_slot": 0, "input_prefix": prefix, "input_suffix": suffix, "input_extra": chunks, "prompt": prompt,
            "n_predict": 128, "n_cmpl": 3, "top_k": 40, "top_p": 0.99, "stream": False,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "n_indent": nindent,
            "t_max_prompt_ms": 500, "t_max_predict_ms": 2500}


def continue_llama_cpp_request(prompt: str) -> dict:
    """Continue's llama.cpp provider (core/llm/llms/LlamaCpp.ts, _streamComplete): POST {apiBase}completion."""
    return {"prompt": prompt, "stream": True, "n_predict": 48, "frequency_penalty": 0, "presence_penalty": 0,
            "min_p": 0.05, "mirostat": 0, "stop": ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<|endoftext|>"],
            "top_k": 40, "top_p": 0.9, "temperature": 0.0}
