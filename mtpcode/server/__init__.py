"""``mtpcode serve --http``: llama.cpp server's, OpenAI's and Ollama's completion APIs over HTTP.

* :mod:`mtpcode.server.app` - the Starlette endpoints;
* :mod:`mtpcode.server.protocol` - request fields and response shapes;
* :mod:`mtpcode.server.infill` - infill prompts for models without FIM tokens, FIM marker
  recognition, and the stops editors ask for (``n_indent``, ``t_max_predict_ms``);
* :mod:`mtpcode.server.scheduler` - one generation at a time on a worker thread, with
  cancellation by newer requests and by disconnects;
* :mod:`mtpcode.server.run` - binding, background model loading, uvicorn, clean shutdown.

Starlette and uvicorn come with the ``server`` extra (``pip install 'mtpcode[server]'``).
"""
