"""The OpenAI-compatible HTTP API (FastAPI): routes, errors, authentication, request limits.

  POST /v1/chat/completions   messages in Meta's chat format (encode_dialog), nothing added
  POST /v1/completions        raw text (BOS + text) or token ids, no template
  GET  /v1/models             the model served and its LoRA adapters (and /v1/models/{id})
  POST /v1/load_lora_adapter  {"lora_name", "lora_path"}: serve another adapter (vLLM's route)
  POST /v1/unload_lora_adapter {"lora_name"}
  GET  /health                200 when ready, 503 while loading or shutting down
  GET  /metrics               Prometheus text

Every error is OpenAI's `{"error": {"message", "type", "param", "code"}}` object. The routes
only talk to the scheduler's thread-safe methods: nothing here calls JAX.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import json
import time

import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama2_jax.inference.adapter_names import AdapterConflict, UnknownAdapter
from llama2_jax.inference.params import SamplingParams
from llama2_jax.inference.requests import ContextError, ShuttingDown
from llama2_jax.inference.scheduler import Scheduler
from llama2_jax.serve import responses, schemas
from llama2_jax.serve.grammar import Grammar, GrammarError, Grammars
from llama2_jax.serve.generation import APIError, Generation, random_seed
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

    def cards(self) -> list[schemas.ModelCard]:
        """The base model, then each adapter a request may name."""
        base = schemas.ModelCard(id=self.model_name, created=self.created,
                                 max_model_len=self.context)
        return [base] + [base.model_copy(update={"id": name, "parent": self.model_name})
                         for name, _ in self.scheduler.adapters.names()]

    def adapter_of(self, model: str) -> str:
        """The adapter a request's `model` names ("" for the base); 404 for neither."""
        if model == self.model_name:
            return ""
        names = [name for name, _ in self.scheduler.adapters.names()]
        if model in names:
            return model
        served = ", ".join(f"'{n}'" for n in [self.model_name, *names])
        raise APIError(404, f"the model '{model}' does not exist; this server serves {served}",
                       param="model", code="model_not_found")

    @functools.cached_property
    def grammars(self) -> Grammars:
        return Grammars(self.tokenizer, self.scheduler.vocab_size)


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
        return schemas.ModelList(data=server.cards()).model_dump(exclude_none=True)

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        _authorize(server, request)
        server.adapter_of(model_id)  # 404 unless served
        card, = [c for c in server.cards() if c.id == model_id]
        return card.model_dump(exclude_none=True)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        _authorize(server, request)
        req = await _parse(server, request, schemas.LoadLoRAAdapterRequest)
        scheduler = server.scheduler
        _check_accepting(scheduler)
        if not scheduler.adapters.capacity:
            raise APIError(400, "this server has no room for LoRA adapters: start it with "
                           "max_loras >= 1", param="lora_name")
        if req.lora_name == server.model_name:
            raise APIError(400, f"'{req.lora_name}' is the base model's name",
                           param="lora_name")
        try:
            future = scheduler.load_adapter(req.lora_name, req.lora_path)
        except AdapterConflict as e:
            raise APIError(400, str(e), param="lora_name") from None
        except ShuttingDown as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        try:
            await asyncio.wrap_future(future)
        except (ValueError, OSError) as e:  # AdapterError is a ValueError
            raise APIError(400, f"lora_path: {e}", param="lora_path") from None
        except ShuttingDown as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        return Response(f"Success: LoRA adapter '{req.lora_name}' added successfully.",
                        media_type="text/plain")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        _authorize(server, request)
        req = await _parse(server, request, schemas.UnloadLoRAAdapterRequest)
        try:
            server.scheduler.unload_adapter(req.lora_name)
        except UnknownAdapter:
            raise APIError(404, f"the LoRA adapter '{req.lora_name}' cannot be found",
                           param="lora_name", code="model_not_found") from None
        return Response(f"Success: LoRA adapter '{req.lora_name}' removed successfully.",
                        media_type="text/plain")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _authorize(server, request)
        req = await _parse(server, request, schemas.ChatCompletionRequest)
        _check_common(server, req)
        for name in ("tools", "tool_choice"):
            if getattr(req, name):
                raise APIError(400, f"{name} is not supported by this server", param=name)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        dialog = [{"role": msg.role, "content": msg.text()} for msg in req.messages]
        try:
            prompt = encode_dialog(server.tokenizer, dialog)
        except DialogError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = req.max_completion_tokens or req.max_tokens
        top = (req.top_logprobs or 0) if req.logprobs else None
        grammar = await _grammar(server, req)
        gen = _generation(server, [prompt], req, max_tokens, top, "messages", grammar=grammar)
        if req.stream:
            return responses.stream(gen, responses.chat_chunks(req.model, gen, req, top))
        return await responses.chat_body(req.model, gen, req, top, request)

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
        grammar = await _grammar(server, req)
        gen = _generation(server, prompts, req, req.max_tokens, req.logprobs, "prompt",
                          score_prompt=req.echo and req.logprobs is not None, grammar=grammar)
        echo = texts if req.echo else None
        if req.stream:
            return responses.stream(gen, responses.completion_chunks(req.model, gen, req, echo))
        return await responses.completion_body(req.model, gen, req, request, echo)

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
    server.adapter_of(req.model)
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
                score_prompt: bool = False, grammar: Grammar | None = None) -> Generation:
    """The request's choices, checked against the context and submitted."""
    scheduler = server.scheduler
    _check_accepting(scheduler)
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
    if max_tokens is not None and req.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({req.min_tokens}) is over max_tokens ({max_tokens})",
                       param="min_tokens")
    stop_ids = frozenset() if req.ignore_eos else frozenset({server.tokenizer.eos_id})
    params = SamplingParams(
        temperature=server.temperature if req.temperature is None else req.temperature,
        top_p=server.top_p if req.top_p is None else req.top_p, top_k=req.top_k or 0,
        seed=random_seed() if req.seed is None else req.seed,
        top_logprobs=bool(top), min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        min_tokens=req.min_tokens, logit_bias=_logit_bias(server, req.logit_bias),
        banned=tuple(stop_ids) if req.min_tokens else ())
    gen = Generation(scheduler, server.tokenizer, prompts, req.n,
                     max_tokens if max_tokens is not None else server.context - longest,
                     params, req.stop_strings(),
                     stop_ids=stop_ids, score_prompt=score_prompt, grammar=grammar,
                     adapter=server.adapter_of(req.model))
    if max_tokens is None:  # each prompt's own room
        for c in gen.choices:
            c.request.max_tokens = server.context - len(c.prompt)
    gen.submit()
    return gen


def _check_accepting(scheduler: Scheduler) -> None:
    if not scheduler.accepting:
        status = "shutting down" if scheduler.ready.is_set() else "still loading the model"
        raise APIError(503, f"the server is {status}", type="server_error",
                       code="unavailable")


GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
          "guided_grammar": "lark"}


async def _grammar(server: Server, req) -> Grammar | None:
    """The request's structured-output grammar, compiled off the device thread (None: free
    text); a 400 naming the parameter for a bad or uncompilable one."""
    asked = [(name, getattr(req, name)) for name in GUIDED if getattr(req, name) is not None]
    kind_of = {"json_object": "json_schema", "json_schema": "json_schema"}
    fmt = req.response_format
    if fmt is not None and fmt.get("type", "text") != "text":
        kind = fmt.get("type")
        if kind not in kind_of:
            raise APIError(400, f"response_format type {kind!r} is not one of 'text', "
                           "'json_object', 'json_schema'", param="response_format")
        if kind == "json_object":
            spec = {"type": "object"}
        else:
            spec = (fmt.get("json_schema") or {}).get("schema")
            if not isinstance(spec, dict):
                raise APIError(400, "response_format json_schema needs json_schema.schema, a "
                               "JSON Schema object", param="response_format")
        asked.append(("response_format", spec))
    if not asked:
        return None
    if len(asked) > 1:
        raise APIError(400, "give one structured-output parameter, not "
                       + " and ".join(name for name, _ in asked), param=asked[1][0])
    name, spec = asked[0]
    if name == "guided_json" and isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise APIError(400, f"guided_json is not valid JSON: {e}", param=name) from None
    kind = "json_schema" if name == "response_format" else GUIDED[name]
    try:
        return await asyncio.to_thread(server.grammars.compile, kind, spec)
    except GrammarError as e:
        raise APIError(400, f"{name}: the grammar does not compile: {e}", param=name) from None


def _logit_bias(server: Server, bias: dict[str, float] | None) -> tuple:
    """OpenAI's logit_bias (token id as a string -> -100..100) as (id, bias) pairs."""
    out = []
    vocab = server.tokenizer.vocab_size
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias: key {key!r} is not a token id",
                           param="logit_bias") from None
        if not 0 <= token < vocab:
            raise APIError(400, f"logit_bias: token id {token} is outside the vocabulary "
                           f"0..{vocab - 1}", param="logit_bias")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias: the bias of token {token} must be in "
                           f"[-100, 100], got {value}", param="logit_bias")
        out.append((token, float(value)))
    return tuple(out)
