"""The one completion handler: every completion endpoint, streamed or not, whatever its API.

:func:`complete` reads the body, lets the endpoint's adapter
(:mod:`mtpcode.server.apis`) parse it into a spec, queues jobs on the
scheduler's worker thread, and writes what they produce through the
adapter's renderers, watching for the client to go away (which cancels its
job). A job that fails is answered through the one error mapping
(:func:`mtpcode.server.errors.api_error`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp

from mtpcode.generation import Piece
from mtpcode.scheduler import Outcome, Scheduler, Started
from mtpcode.server.apis import Api
from mtpcode.server.errors import api_error
from mtpcode.server.protocol import Partial, Result
from mtpcode.server.state import ServerState, ready
from mtpcode.server.task import ServerJob, Spec, make_job, to_result
from mtpcode.server.transport import EventStream, json_response, read_json, wait_disconnect

NO_CONTENT = 204  # the answer to a client that left before its answer was ready


async def complete(request: Request, state: ServerState, api: Api) -> ASGIApp:
    """Answer a completion request of ``api``: 503 while the model loads, 4xx for a bad request,
    the rendered answer (streamed if the request asks) otherwise."""
    body = await read_json(request, state.max_body)
    scheduler = ready(state)
    spec = api.parse(state, body)
    if spec.params.stream:
        return await stream(request, scheduler, api, spec)
    results = await run_all(request, scheduler, spec)
    if results is None:
        return Response(status_code=NO_CONTENT)
    return json_response(api.render_final(spec, results))


async def run_all(request: Request, scheduler: Scheduler, spec: Spec) -> list[Result] | None:
    """Run ``spec`` ``n_cmpl`` times (once when greedy: the answers would be the same).

    None if the client disconnected; a failed run raises its ApiError. A run cut
    short (superseded) ends the others too: they answer "cancelled", empty.
    """
    n = spec.params.n_cmpl
    runs = 1 if spec.options.sampling.greedy else n
    results: list[Result] = []
    for i in range(runs):
        job = make_job(scheduler.engine, spec, pieces=False, seed_offset=i, label=_label(request))
        outcome = await run_once(request, scheduler, job)
        if outcome is None:
            return None
        if outcome.error is not None:
            raise api_error(outcome.error)
        results.append(to_result(job, outcome, index=i))
        if outcome.cancelled is not None:
            break  # (the next runs, sent with the same key, would supersede the client's newer request)
    while len(results) < n:
        same = results[0] if runs == 1 else replace(results[-1], content="")
        results.append(replace(same, index=len(results)))
    return results


async def stream(request: Request, scheduler: Scheduler, api: Api, spec: Spec) -> ASGIApp:
    """Run ``spec`` once, streaming each piece and then the end through ``api``'s renderers.

    The response starts once the job's turn has come and its prompt was built,
    so that a request that cannot run still gets its 4xx status. A failure
    after that ends the stream with the API's error event (Api.render_error).
    """
    job = make_job(scheduler.engine, spec, pieces=True, label=_label(request))
    scheduler.submit(job)
    first = await next_event(request, scheduler, job)
    if first is None:
        return Response(status_code=NO_CONTENT)
    if isinstance(first, Outcome) and first.error is not None:
        raise api_error(first.error)

    async def chunks() -> AsyncIterator[bytes]:
        events = job.events
        item = first
        n_decoded = 0
        while True:
            if isinstance(item, Piece):
                n_decoded += len(item.token_ids)
                if item.text:  # (tokens whose text is held back, a stop string's start, count all the same)
                    yield api.render_piece(spec, Partial(item.text, n_decoded, job.plan.n_prompt, slot=job.ran_on))
            elif isinstance(item, Outcome):
                if item.error is not None:
                    yield api.render_error(spec, api_error(item.error))
                else:
                    yield api.render_end(spec, to_result(job, item))
                return
            item = await events.get()

    return EventStream(chunks(), lambda: scheduler.abandon(job), media_type=api.media_type)


def _label(request: Request) -> str:
    """The client and path of ``request``, as the log names it."""
    client = f"{request.client.host}:{request.client.port}" if request.client else "?"
    return f"{client} {request.url.path}"


async def next_event(request: Request, scheduler: Scheduler, job: ServerJob) -> Piece | Outcome | Started | None:
    """The job's next event; None if the client disconnected first (the job is then cancelled)."""
    events = job.events
    get = asyncio.ensure_future(events.get())
    watch = asyncio.ensure_future(wait_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        scheduler.abandon(job)
        return None
    finally:
        watch.cancel()


async def run_once(request: Request, scheduler: Scheduler, job: ServerJob) -> Outcome | None:
    """Submit ``job`` and wait for its Outcome; None if the client disconnected (the job is cancelled)."""
    scheduler.submit(job)
    while True:
        item = await next_event(request, scheduler, job)
        if item is None or isinstance(item, Outcome):
            return item
