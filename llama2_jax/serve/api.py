"""The OpenAI-compatible HTTP API (FastAPI): routes, errors, authentication, request limits.

  POST /v1/chat/completions   messages in Meta's chat format (encode_dialog), nothing added
  POST /v1/completions        raw text (BOS + text) or token ids, no template
  GET  /v1/models             the one model served (and /v1/models/{id})
  GET  /health                200 when ready, 503 while loading or shutting down
  GET  /metrics               Prometheus text

Every error is OpenAI's `{"error": {"message", "type", "param", "code"}}` object. The routes
only talk to the scheduler's thread-safe methods: nothing here calls JAX.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import time
import uuid

import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama2_jax.inference.params import SamplingParams
from llama2_jax.inference.requests import ContextError
from llama2_jax.inference.scheduler import Scheduler
from llama2_jax.serve import schemas
from llama2_jax.serve.generation import APIError, Generation, join_logprobs, random_seed
from llama2_jax.serve.metrics import Metrics
from llama2_jax.tokenizer import DialogError, Tokenizer, encode_dialog


@dataclasses.dataclass
class Server:
    """What the routes need: the scheduler and tokenizer, and the server's settings."""

    scheduler: Scheduler
    tokenizer: Tokenizer
    metrics: Metrics
    model_name: str
    api_key: str = ""
    max_body_bytes: int = 1 << 20
    temperature: float = 0.6  # for requests that do not set it (Meta's chat defaults)
    top_p: float = 0.9
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def context(self) -> int:
        return self.scheduler.length


def error_response(e: APIError) -> JSONResponse:
    body = schemas.ErrorResponse(error=schemas.ErrorBody(
        message=e.message, type=e.type, param=e.param, code=e.code))
    return JSONResponse(body.model_dump(), status_code=e.status, headers=e.headers)


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="llama2_jax", docs_url=None, redoc_url=None)
    app.state.server = server
    m = server.metrics

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return error_response(APIError(e.status_code, str(e.detail), code=str(e.status_code)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        return error_response(_validation(e.errors()))

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        m.requests.labels(getattr(route, "path", "other"), str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health():
        s = server.scheduler
        if s.accepting:
            return {"status": "ok"}
        state = ("error: " + s.error if s.error else "loading" if not s.ready.is_set()
                 else "shutting down")
        return JSONResponse({"status": state}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(m.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(server, request)
        card = schemas.ModelCard(id=server.model_name, created=server.created,
                                 max_model_len=server.context)
        return schemas.ModelList(data=[card]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        _authorize(server, request)
        if model_id != server.model_name:
            raise APIError(404, f"the model '{model_id}' does not exist; this server serves "
                           f"'{server.model_name}'", param="model", code="model_not_found")
        return schemas.ModelCard(id=server.model_name, created=server.created,
                                 max_model_len=server.context).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _authorize(server, request)
        req = await _parse(server, request, schemas.ChatCompletionRequest)
        _check_common(server, req)
        for name in ("tools", "tool_choice"):
            if getattr(req, name):
                raise APIError(400, f"{name} is not supported by this server", param=name)
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format type 'text' is supported",
                           param="response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        dialog = [{"role": msg.role, "content": msg.text()} for msg in req.messages]
        try:
            prompt = encode_dialog(server.tokenizer, dialog)
        except DialogError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = req.max_completion_tokens or req.max_tokens
        top = (req.top_logprobs or 0) if req.logprobs else None
        gen = _generation(server, [prompt], req, max_tokens, top, "messages")
        if req.stream:
            return _stream(gen, _chat_chunks(server, gen, req, top))
        return await _chat_body(server, gen, req, top, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        _authorize(server, request)
        req = await _parse(server, request, schemas.CompletionRequest)
        _check_common(server, req)
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens 0 needs echo: true (the prompt's log-probabilities"
                           " alone)", param="max_tokens")
        if req.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of must equal n (or be left out)", param="best_of")
        prompts, texts = _completion_prompts(server, req.prompt)
        gen = _generation(server, prompts, req, req.max_tokens, req.logprobs, "prompt",
                          score_prompt=req.echo and req.logprobs is not None)
        echo = texts if req.echo else None
        if req.stream:
            return _stream(gen, _completion_chunks(server, gen, req, echo))
        return await _completion_body(server, gen, req, request, echo)

    return app


# -- request checks ---------------------------------------------------------------------------
def _authorize(server: Server, request: Request) -> None:
    if not server.api_key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), server.api_key):
        raise APIError(401, "a valid API key is required (header 'Authorization: Bearer "
                       "<key>')", type="authentication_error", code="invalid_api_key")


async def _parse(server: Server, request: Request, model: type[pydantic.BaseModel]):
    """The body as `model`: 413 past the size limit, 400 for bad JSON or a bad field."""
    limit = server.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes is over the limit of {limit}",
                       code="body_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(413, f"request body is over the limit of {limit} bytes",
                           code="body_too_large")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        raise _validation(e.errors()) from None


def _validation(errors) -> APIError:
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    return APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid')}"
                    + (f" (got {first['input']!r})" if "input" in first and loc else ""),
                    param=param)


def _check_common(server: Server, req) -> None:
    if req.model != server.model_name:
        raise APIError(404, f"the model '{req.model}' does not exist; this server serves "
                       f"'{server.model_name}'", param="model", code="model_not_found")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise APIError(400, f"{name} is not supported by this server (only 0)", param=name)
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
    if len(req.stop_strings()) > schemas.MAX_STOP:
        raise APIError(400, f"stop takes at most {schemas.MAX_STOP} strings", param="stop")


def _completion_prompts(server: Server, prompt) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt: text gets BOS + its tokens, ids are taken as they
    are (their text is their decoding)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    out, texts = [], []
    for p in prompt:
        ids = server.tokenizer.encode(p, bos=True) if isinstance(p, str) else list(p)
        vocab = server.tokenizer.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary 0..{vocab - 1}",
                           param="prompt")
        out.append(ids)
        texts.append(p if isinstance(p, str) else server.tokenizer.decode(ids))
    return out, texts


def _generation(server: Server, prompts, req, max_tokens, top, prompt_param,
                score_prompt: bool = False) -> Generation:
    """The request's choices, checked against the context and submitted."""
    scheduler = server.scheduler
    if not scheduler.accepting:
        status = "shutting down" if scheduler.ready.is_set() else "still loading the model"
        raise APIError(503, f"the server is {status}", type="server_error",
                       code="unavailable")
    for p in prompts:
        tokens = max_tokens if max_tokens is not None else server.context - len(p)
        if max_tokens is None and tokens < 1:
            raise APIError(400, f"the prompt has {len(p)} tokens, which leaves no room to "
                           f"answer in the context of {server.context}", param=prompt_param)
        try:
            scheduler.check(len(p), tokens)
        except ContextError as e:
            raise APIError(400, str(e), param="max_tokens" if max_tokens else prompt_param,
                           code="context_length_exceeded") from None
    longest = max(len(p) for p in prompts)
    params = SamplingParams(
        temperature=server.temperature if req.temperature is None else req.temperature,
        top_p=server.top_p if req.top_p is None else req.top_p, top_k=req.top_k or 0,
        seed=random_seed() if req.seed is None else req.seed,
        top_logprobs=bool(top))
    gen = Generation(scheduler, server.tokenizer, prompts, req.n,
                     max_tokens if max_tokens is not None else server.context - longest,
                     params, req.stop_strings(),
                     stop_ids=frozenset() if req.ignore_eos else None,
                     score_prompt=score_prompt)
    if max_tokens is None:  # each prompt's own room
        for c in gen.choices:
            c.request.max_tokens = server.context - len(c.prompt)
    gen.submit()
    return gen


# -- responses --------------------------------------------------------------------------------
def _sse(payload) -> str:
    data = payload.model_dump_json() if isinstance(payload, pydantic.BaseModel) else \
        json.dumps(payload)
    return f"data: {data}\n\n"


def _stream(gen: Generation, chunks) -> StreamingResponse:
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


async def _chat_chunks(server: Server, gen: Generation, req, top):
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    usage_chunks = bool(req.stream_options and req.stream_options.include_usage)
    begun: set[int] = set()  # choices whose first tokens went out

    def ids(tokens):
        return _ids(tokens) if req.return_token_ids and tokens else None

    def chunk(choices, usage=None):
        return schemas.ChatCompletionChunk(id=ident, created=created, model=server.model_name,
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


async def _chat_body(server: Server, gen: Generation, req, top, request: Request):
    texts = {c.index: [] for c in gen.choices}
    tokens = {c.index: [] for c in gen.choices}
    async for u in gen.updates(_disconnected(request)):
        texts[u.index].append(u.text)
        tokens[u.index] += u.tokens
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
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=server.model_name,
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


async def _completion_chunks(server: Server, gen: Generation, req, echo: list[str] | None):
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
        yield schemas.Completion(id=ident, created=created, model=server.model_name,
                                 choices=[schemas.CompletionChoice(
                                     index=u.index, text=text, logprobs=logprobs,
                                     finish_reason=u.finish_reason,
                                     token_ids=_ids(u.tokens) if req.return_token_ids
                                     else None)])
    if usage_chunks:
        yield schemas.Completion(id=ident, created=created, model=server.model_name,
                                 choices=[], usage=gen.usage)


async def _completion_body(server: Server, gen: Generation, req, request: Request,
                           echo: list[str] | None):
    texts = {c.index: [] for c in gen.choices}
    tokens = {c.index: [] for c in gen.choices}
    async for u in gen.updates(_disconnected(request)):
        texts[u.index].append(u.text)
        tokens[u.index] += u.tokens
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
        id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=server.model_name,
        choices=choices, usage=gen.usage,
        prompt_token_ids=gen.prompts if req.return_token_ids else None).model_dump()


def _ids(tokens) -> list[int]:
    return [t.id for t in tokens]
