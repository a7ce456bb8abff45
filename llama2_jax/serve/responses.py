"""The bodies of the OpenAI-compatible responses: chat and text completions, whole or streamed
as server-sent events, with logprobs and `echo` (llama2_jax.serve.api's routes call these)."""

from __future__ import annotations

import json
import time
import uuid

import pydantic
from fastapi import Request
from fastapi.responses import StreamingResponse

from llama2_jax.serve import schemas
from llama2_jax.serve.generation import APIError, Generation, join_logprobs


# -- responses --------------------------------------------------------------------------------
def _sse(payload) -> str:
    data = payload.model_dump_json() if isinstance(payload, pydantic.BaseModel) else \
        json.dumps(payload)
    return f"data: {data}\n\n"


def stream(gen: Generation, chunks) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                yield _sse(chunk)
        except APIError as e:  # the stream has begun: report it in the stream
            yield _sse({"error": {"message": e.message, "type": e.type, "param": e.param,
                                  "code": e.code}})
        finally:
            gen.cancel()  # a client that went away frees its slots (no-op when all ended)
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def _disconnected(request: Request):
    async def check() -> bool:
        return await request.is_disconnected()
    return check


async def chat_chunks(model: str, gen: Generation, req, top):
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    usage_chunks = bool(req.stream_options and req.stream_options.include_usage)
    begun: set[int] = set()  # choices whose first tokens went out

    def ids(tokens):
        return _ids(tokens) if req.return_token_ids and tokens else None

    def chunk(choices, usage=None):
        return schemas.ChatCompletionChunk(id=ident, created=created, model=model,
                                           choices=choices, usage=usage)

    yield chunk([schemas.ChatChunkChoice(index=c.index, delta=schemas.Delta(role="assistant",
                                                                            content=""))
                 for c in gen.choices])
    async for u in gen.updates():
        logprobs = None
        if top is not None and u.tokens:
            logprobs = {"content": gen.chat_logprobs(u.tokens, top, u.index not in begun)}
        if u.tokens:
            begun.add(u.index)
        unsent = u.tokens  # logprobs and ids go with the first chunk of the update
        if u.text or u.finish_reason is None:
            yield chunk([schemas.ChatChunkChoice(index=u.index, delta=schemas.Delta(
                content=u.text), logprobs=logprobs, token_ids=ids(unsent))])
            logprobs, unsent = None, []
        if u.finish_reason is not None:
            yield chunk([schemas.ChatChunkChoice(index=u.index, delta=schemas.Delta(),
                                                 logprobs=logprobs,
                                                 finish_reason=u.finish_reason,
                                                 token_ids=ids(unsent))])
    if usage_chunks:
        yield chunk([], usage=gen.usage)


async def _collect(gen: Generation, request: Request) -> tuple[dict, dict]:
    """Every choice's text pieces and tokens, once all have ended (or the client left)."""
    texts = {c.index: [] for c in gen.choices}
    tokens = {c.index: [] for c in gen.choices}
    async for u in gen.updates(_disconnected(request)):
        texts[u.index].append(u.text)
        tokens[u.index] += u.tokens
    return texts, tokens


async def chat_body(model: str, gen: Generation, req, top, request: Request):
    texts, tokens = await _collect(gen, request)
    choices = []
    for c in gen.choices:
        logprobs = None
        if top is not None:
            logprobs = {"content": gen.chat_logprobs(tokens[c.index], top, True)}
        choices.append(schemas.ChatChoice(
            index=c.index, message=schemas.AssistantMessage(content="".join(texts[c.index])),
            logprobs=logprobs, finish_reason=c.finish_reason,
            token_ids=_ids(tokens[c.index]) if req.return_token_ids else None))
    return schemas.ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model,
        choices=choices, usage=gen.usage,
        prompt_token_ids=gen.prompts if req.return_token_ids else None).model_dump()


def _echo_head(gen: Generation, req, c, echo: list[str],
               first: list) -> tuple[str, int, dict | None]:
    """What an `echo` choice starts with: its prompt's text and, when its answer's first
    token begins with the space a standalone decoding drops, that space (`first`: the
    answer's tokens, or none yet); where the answer's first token starts in it; the prompt's
    logprobs."""
    text = echo[c.index // gen.n]
    logprobs = gen.echo_logprobs(c, req.logprobs) if req.logprobs is not None else None
    return text + (gen.dropped_space(first[0].id) if first else ""), len(text), logprobs


async def completion_chunks(model: str, gen: Generation, req, echo: list[str] | None):
    """Streamed choices; with `echo`, each choice's first chunk starts with its prompt."""
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    usage_chunks = bool(req.stream_options and req.stream_options.include_usage)
    offsets = {c.index: 0 for c in gen.choices}
    begun: set[int] = set()
    async for u in gen.updates():
        head, start, head_lps = "", 0, None
        if u.index not in begun and (u.tokens or u.finish_reason):
            begun.add(u.index)
            at_start = True
            if echo is not None:
                head, start, head_lps = _echo_head(gen, req, gen.choices[u.index], echo,
                                                   u.tokens)
                at_start = False
        else:
            at_start = False
        logprobs = None
        if req.logprobs is not None:
            offset = offsets[u.index] + start
            logprobs = gen.completion_logprobs(u.tokens, req.logprobs, offset, at_start)
            if head_lps is not None:
                logprobs = join_logprobs(head_lps, logprobs)
        text = head + u.text
        offsets[u.index] += len(text)
        yield schemas.Completion(id=ident, created=created, model=model,
                                 choices=[schemas.CompletionChoice(
                                     index=u.index, text=text, logprobs=logprobs,
                                     finish_reason=u.finish_reason,
                                     token_ids=_ids(u.tokens) if req.return_token_ids
                                     else None)])
    if usage_chunks:
        yield schemas.Completion(id=ident, created=created, model=model,
                                 choices=[], usage=gen.usage)


async def completion_body(model: str, gen: Generation, req, request: Request,
                           echo: list[str] | None):
    texts, tokens = await _collect(gen, request)
    choices = []
    for c in gen.choices:
        head, start, head_lps = "", 0, None
        if echo is not None:
            head, start, head_lps = _echo_head(gen, req, c, echo, tokens[c.index])
        logprobs = None
        if req.logprobs is not None:
            logprobs = gen.completion_logprobs(tokens[c.index], req.logprobs, start,
                                               echo is None)
            if head_lps is not None:
                logprobs = join_logprobs(head_lps, logprobs)
        choices.append(schemas.CompletionChoice(
            index=c.index, text=head + "".join(texts[c.index]), logprobs=logprobs,
            finish_reason=c.finish_reason,
            token_ids=_ids(tokens[c.index]) if req.return_token_ids else None))
    return schemas.Completion(
        id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model,
        choices=choices, usage=gen.usage,
        prompt_token_ids=gen.prompts if req.return_token_ids else None).model_dump()


def _ids(tokens) -> list[int]:
    return [t.id for t in tokens]
