"""``mtpcode serve --http``: llama.cpp server's, OpenAI's and Ollama's completion APIs over HTTP.

A request goes down the list and its answer comes back up it:

* :mod:`mtpcode.server.app` - the route table, the API-key guard, the exception handlers;
* :mod:`mtpcode.server.completion` - the one completion handler, for every API, streamed or not;
* :mod:`mtpcode.server.apis` - one adapter per API: request body -> spec, typed results -> bytes;
* :mod:`mtpcode.server.info` - health, props, models, metrics, Ollama's tags and show;
  what the server says about its model, written once;
* :mod:`mtpcode.server.task` - the common spec of a request, its plan (the prompt and stops,
  built on the worker thread), its scheduler job and typed result;
* :mod:`mtpcode.server.protocol` - what the APIs share: JSON spelling, request fields, typed results;
* :mod:`mtpcode.server.infill` - infill prompts for models without FIM tokens, FIM marker recognition;
* :mod:`mtpcode.scheduler` (shared with the REPL and ``serve --stdio``) - the requests on the
  engine's slots, batched in one step on a worker thread, cancelled by the same client's next
  keystroke or by its disconnecting;
* :mod:`mtpcode.server.errors` - ApiError, and the one mapping from an exception to a status and body;
* :mod:`mtpcode.server.transport` - JSON bodies in and out, streams that notice a client leaving;
* :mod:`mtpcode.server.state` - what the handlers share (settings, model names, engine, scheduler);
* :mod:`mtpcode.server.run` - binding, background model loading, uvicorn, clean shutdown.

Starlette and uvicorn come with the ``server`` extra (``pip install 'mtpcode[server]'``).
"""
