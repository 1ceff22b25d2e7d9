"""The completion APIs the server speaks: one adapter per API, one module per family.

* :mod:`~mtpcode.server.apis.llama` - llama.cpp server's ``/completion`` and ``/infill``
  (llama.vim, llama.vscode, Continue, Tabby);
* :mod:`~mtpcode.server.apis.openai` - OpenAI's ``/v1/completions``;
* :mod:`~mtpcode.server.apis.ollama` - Ollama's ``/api/generate``.

An adapter is the whole difference between two APIs: how a request body
becomes the common :class:`~mtpcode.server.task.Spec`, and how the typed
values of a generation (:class:`~mtpcode.server.protocol.Partial` pieces, then a
:class:`~mtpcode.server.protocol.Result` per completion) are written back. The one
completion handler (:func:`mtpcode.server.completion.complete`) does the rest
for every API: reading the body, queueing, streaming, cancelling, errors.

To add an API: write a module here with a class that has the members of
:class:`Api` (parse with the helpers of :mod:`mtpcode.server.task`; render
with :func:`~mtpcode.server.protocol.dumps` or
:func:`~mtpcode.server.protocol.sse`), and give its path a
``completion_route`` in :func:`mtpcode.server.app.routes` (mypy checks the
class against :class:`Api` there). Its model listing, if it has one, goes
with the others in :mod:`mtpcode.server.info`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from mtpcode.server.errors import ApiError
from mtpcode.server.protocol import Partial, Result
from mtpcode.server.state import ServerState
from mtpcode.server.task import Spec


class Api(Protocol):
    """One API's completion endpoint: parse a request, render what the generation yields."""

    media_type: str  # of a streamed answer (a complete answer is always application/json)

    def parse(self, state: ServerState, body: dict[str, Any]) -> Spec:
        """The request ``body`` as the common spec; ApiError (4xx) for what the API does not accept."""
        ...

    def render_piece(self, spec: Spec, piece: Partial) -> bytes:
        """One chunk of a streamed answer."""
        ...

    def render_end(self, spec: Spec, result: Result) -> bytes:
        """What a streamed answer ends with, after its last piece."""
        ...

    def render_error(self, spec: Spec, error: ApiError) -> bytes:
        """What a streamed answer ends with when the generation fails after it started."""
        ...

    def render_final(self, spec: Spec, results: Sequence[Result]) -> Any:
        """The JSON value of an answer that was not streamed: ``results`` has one result per completion asked."""
        ...
