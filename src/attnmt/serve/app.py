"""The HTTP service of ``attnmt-serve``: a FastAPI application over one opened engine.

Routes:

- ``POST /translate``: ``{"text": [lines], "tgt_lang"?, "src_lang"?, "attention"?, and the decode
  settings of attnmt-translate but max_tokens, the server's batches (beam_size, len_penalty, nbest, ...)}`` ->
  ``{"translations": [one per line, in order], "scores": [...]}`` (length-normalised log-probabilities,
  null for greedy search, which computes none, and 0 for an empty line), with ``"nbest"`` (each line's
  candidates, best first) when ``nbest > 1`` and ``"attention"`` (each line's source and target
  pieces and cross-attention weights ``[layer][head][target][source]``) when asked for.
- ``GET /health``: ``{"status": "ok", ...}`` with the queue's counters.
- ``GET /info``: the model, its languages, the engine, the decode defaults and the request limits.
- ``GET /``: a page that translates what is typed and draws the cross-attention.

A bad request is answered 4xx with ``{"error": MESSAGE, "field": FIELD}`` (``field`` names the JSON
field, ``text[3]`` for a line) and the service goes on: 400 for a body that is not JSON, 413 for more
than the configured lines, line bytes or body bytes, 422 for a value of the wrong type or out of
range (checked by the same config code as the command line's), 503 while the queue is full.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from contextlib import asynccontextmanager
from dataclasses import asdict, fields, replace
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from attnmt.config import ConfigError, DecodeConfig, ServeConfig, check_beam_limit
from attnmt.decoding import max_length
from attnmt.inference import Engine, check_capabilities, language_prefixes, model_languages
from attnmt.serve.batcher import Batcher, Job, Overloaded, Result, RunningBatcher
from attnmt.tokenizer import TokenizerError

log = logging.getLogger(__name__)


class TranslateRequest(BaseModel):
    """The body of ``POST /translate``: the lines, and what to change of the server's defaults.

    Types are strict (``"5"`` is not a number, ``5.0`` not an integer), non-finite numbers and
    unknown fields are refused.
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    text: list[str]
    tgt_lang: str | None = None
    src_lang: str | None = None
    attention: bool = False  # each line's cross-attention maps too (engine=native)
    beam_size: int | None = None
    len_penalty: float | None = None
    nbest: int | None = None
    max_len_a: float | None = None
    max_len_b: int | None = None
    min_len: int | None = None
    beam_stop: str | None = None
    sampling: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None


DECODE_KEYS = tuple(f.name for f in fields(DecodeConfig) if f.name in TranslateRequest.model_fields)


class RequestError(Exception):
    """A request the service answers ``status`` with ``{"error": message, "field": field}``."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


def create_app(engine: Engine, cfg: ServeConfig, model_name: str) -> FastAPI:
    """The service of ``engine`` with the settings, defaults and limits of ``cfg``.

    The batcher starts and stops with the application (its lifespan): under uvicorn, SIGTERM stops
    taking connections, lets the requests in flight finish, then stops the batcher.
    """
    defaults = DecodeConfig(**{f.name: getattr(cfg, f.name) for f in fields(DecodeConfig)})
    if cfg.batching == "continuous":
        if not engine.capabilities.continuous:
            raise ConfigError(f"batching=continuous needs engine=native (engine={engine.name} has no running "
                              "search); use batching=per_call")
        batcher = RunningBatcher(engine, cfg.max_rows, cfg.max_pending_lines)
    else:
        batcher = Batcher(engine, cfg.batch_wait_ms / 1000, cfg.gather_tokens, cfg.max_pending_lines)
    directions = Directions(engine, cfg.src_lang, cfg.tgt_lang)  # defaults, if any, were checked by open_engine

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="attnmt", summary=f"attnmt-serve: {model_name}", lifespan=lifespan)
    app.state.batcher = batcher

    add_error_handlers(app)

    @app.post("/translate", openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": TranslateRequest.model_json_schema()}}}})
    async def translate(request: Request) -> Response:
        body = parse_request(await read_body(request, cfg.max_request_bytes), cfg)
        decode = decode_config(body, defaults, engine, cfg.max_beam_size)
        prefix, tgt_prefix = directions.resolve(body.src_lang, body.tgt_lang)
        sources = engine.encode(body.text, prefix=prefix)
        if body.attention:
            check_attention_size(engine, sources, decode)
        try:
            future = batcher.submit(Job(sources, decode, tuple(tgt_prefix), body.attention))
        except Overloaded as err:
            raise RequestError(503, f"the server is busy ({err}); try again shortly", headers={"Retry-After": "1"}) from None
        result = await answer_unless_gone(request, future)
        if result is None:
            return Response(status_code=499)  # nobody is there to read it
        return JSONResponse(response_body(result, decode.nbest, engine if body.attention else None, sources))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "pending_lines": batcher.pending_lines, "translated_lines": batcher.translated_lines,
                "engine_calls": batcher.engine_calls, "engine_seconds": round(batcher.engine_seconds, 3),
                "engine_rows": getattr(batcher, "engine_rows", None)}

    info = service_info(engine, cfg, model_name, defaults)

    @app.get("/info")
    async def get_info() -> dict:
        return info

    page = resources.files("attnmt.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def get_page() -> HTMLResponse:
        return HTMLResponse(page)

    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error answered as ``{"error": message, "field": field}``: a bad request with its status, an
    unknown route or method with FastAPI's, a client gone while it sent its body as 499 (and one log line),
    anything else as 500."""

    @app.exception_handler(RequestError)
    async def request_error(_request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse({"error": err.message, "field": err.field}, status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, err: HTTPException) -> JSONResponse:  # 404, 405, ...
        return JSONResponse({"error": str(err.detail), "field": None}, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, _err: ClientDisconnect) -> Response:
        # A client that goes while sending its body is no server error: one line, not a traceback.
        log.info("a client (%s) disconnected before its request was read", request.client.host if request.client
                 else "?")
        return Response(status_code=499)  # nobody is there to read it

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, err: Exception) -> JSONResponse:  # logged by the server too
        return JSONResponse({"error": f"internal error: {type(err).__name__}: {err}", "field": None}, status_code=500)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request body has {int(declared)} bytes; this server takes at most {limit} "
                                "(max_request_bytes): send fewer lines per request")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the request body exceeds {limit} bytes (max_request_bytes): "
                                    "send fewer lines per request")
        chunks.append(chunk)
    return b"".join(chunks)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def unicode_bytes(text: str, field: str) -> int:
    """The UTF-8 size of ``text``; a RequestError (422, naming ``field``) where it is no Unicode text:
    JSON's ``"\\ud800"`` escapes can make lone surrogates, which no text holds and no answer can echo."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as err:
        raise RequestError(422, f"{field} is not valid Unicode ({err.reason} at character {err.start + 1})",
                           field) from None


def parse_request(body: bytes, cfg: ServeConfig) -> TranslateRequest:
    """The request in ``body``, checked against the types and the limits of ``cfg``."""
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RequestError(400, f"the body is not JSON ({err}); send e.g. {{\"text\": [\"Ein Hund rennt.\"]}}",
                           "body") from None
    if not isinstance(data, dict):
        raise RequestError(422, "the body must be a JSON object, e.g. {\"text\": [\"Ein Hund rennt.\"]}", "body")
    try:
        request = TranslateRequest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = field_name(first["loc"])
        if first["type"] == "missing":
            raise RequestError(422, f"{field} is required: a list of lines, e.g. {{\"text\": [\"Ein Hund rennt.\"]}}",
                               field) from None
        if first["type"] == "extra_forbidden":
            known = ", ".join(TranslateRequest.model_fields)
            raise RequestError(422, f"{field} is not a field of a translation request; the fields are {known}",
                               field) from None
        raise RequestError(422, f"{field}: {first['msg'].lower()}", field) from None
    if not request.text:
        raise RequestError(422, "text must hold at least one line", "text")
    if len(request.text) > cfg.max_lines:
        raise RequestError(413, f"text has {len(request.text)} lines; this server takes at most {cfg.max_lines} "
                                "a request (max_lines): split them over several requests", "text")
    for field in ("src_lang", "tgt_lang"):  # checked before they reach a message: one that echoes them must encode
        value = getattr(request, field)
        if value is not None:
            unicode_bytes(value, field)
    for i, line in enumerate(request.text):
        size = unicode_bytes(line, f"text[{i}]")
        if size > cfg.max_line_bytes:
            raise RequestError(413, f"text[{i}] has {size} bytes; this server takes lines of at most "
                                    f"{cfg.max_line_bytes} (max_line_bytes): split it into sentences", f"text[{i}]")
    return request


def field_name(loc: tuple) -> str:
    """``("text", 3)`` -> ``"text[3]"``."""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


def decode_config(request: TranslateRequest, defaults: DecodeConfig, engine: Engine, max_beam_size: int) -> DecodeConfig:
    """The server's decode settings with the request's on top, checked as the command line's are."""
    changes = {key: getattr(request, key) for key in DECODE_KEYS if getattr(request, key) is not None}
    try:
        cfg = replace(defaults, **changes)
        cfg.check()
        check_capabilities(engine.name, engine.capabilities, cfg)
        check_beam_limit(cfg, max_beam_size)
    except ConfigError as err:
        match = re.match(r"(\w+)=", str(err))
        raise RequestError(422, str(err), match.group(1) if match else None) from None
    if request.attention and not engine.capabilities.attention:
        raise RequestError(422, f"attention maps need engine=native; this server runs engine={engine.name}", "attention")
    return cfg


# The most attention weights one request may ask for (at most layers x heads x target x source pieces
# a line): about 40 MB of JSON. Each weight is a Python float on its way out, so a request with no
# such bound (1,000 long lines of a 6-layer, 8-head model) could take gigabytes.
MAX_ATTENTION_WEIGHTS = 4_000_000


def check_attention_size(engine: Engine, sources: list[list[int]], cfg: DecodeConfig) -> None:
    """Refuse (413, field ``attention``) a request whose attention maps could exceed
    :data:`MAX_ATTENTION_WEIGHTS`, counting each line's longest possible translation."""
    model = engine.run_config.get("model") or {}
    per_pair = (model.get("decoder_layers") or 1) * (model.get("n_heads") or 1)
    bound = sum(per_pair * len(source) * (max_length(len(source), cfg.max_len_a, cfg.max_len_b,
                                                     engine.backend.max_positions) + 1)
                for source in sources if source)
    if bound > MAX_ATTENTION_WEIGHTS:
        raise RequestError(413, f"these lines' attention maps could hold {bound:,} weights; a request may ask for "
                                f"{MAX_ATTENTION_WEIGHTS:,}: ask for attention with fewer or shorter lines", "attention")


class Directions:
    """The ids that ask for a direction (:func:`~attnmt.inference.language_prefixes`), per (source,
    target) pair asked for, computed once each (its zero-shot warning logged once)."""

    def __init__(self, engine: Engine, src_lang: str | None, tgt_lang: str | None) -> None:
        self.engine = engine
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        self._known: dict[tuple, tuple[list[int], list[int]]] = {}

    def resolve(self, src_lang: str | None, tgt_lang: str | None) -> tuple[list[int], list[int]]:
        """(ids before each source, ids forced first in each translation) for the direction asked
        for, the server's defaults filling what the request leaves out.

        Raises:
            RequestError: 422 naming ``src_lang`` or ``tgt_lang``: the model has no such direction.
        """
        key = (src_lang or self.src_lang, tgt_lang or self.tgt_lang)
        if key not in self._known:
            try:
                self._known[key] = language_prefixes(self.engine.tokenizer, self.engine.run_config, key[1], key[0])
            except TokenizerError as err:
                field = "src_lang" if str(err).startswith("src_lang") else "tgt_lang"
                raise RequestError(422, str(err), field) from None
        return self._known[key]


async def answer_unless_gone(request: Request, future: asyncio.Future) -> Result | None:
    """The job's result, or None (the job cancelled: dropped if not yet begun) if the client disconnects first."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({future, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if future.done():
        return future.result()
    future.cancel()
    return None


def response_body(result: Result, nbest: int, engine: Engine | None, sources: list[list[int]]) -> dict:
    """The JSON answer: translations (and scores) in order, n-best lists, attention maps."""
    body: dict[str, Any] = {"translations": [t.texts[0] for t in result.translations],
                            "scores": [score(t.scores[0]) for t in result.translations]}
    if nbest > 1:
        body["nbest"] = [[{"text": text, "score": score(value)} for text, value in zip(t.texts, t.scores)]
                         for t in result.translations]
    if engine is not None and result.attention is not None:
        tokenizer = engine.tokenizer
        body["attention"] = [
            None if maps is None else {
                "src_pieces": tokenizer.src_pieces(source),
                "tgt_pieces": tokenizer.tgt_pieces(t.tokens[0] + [tokenizer.eos_id]),
                "weights": maps,  # [layer][head][target][source]
            }
            for source, t, maps in zip(sources, result.translations, result.attention)
        ]
    return body


def score(value: float) -> float | None:
    """A hypothesis's score for JSON: None where the search computes none (greedy search's NaN)."""
    return round(value, 4) if math.isfinite(value) else None


def service_info(engine: Engine, cfg: ServeConfig, model_name: str, defaults: DecodeConfig) -> dict:
    """What ``GET /info`` tells: enough for a client (and the page) to build requests."""
    model = engine.run_config.get("model") or {}
    return {
        "model": model_name,
        "engine": engine.name,
        "attention": engine.capabilities.attention,
        "architecture": {key: model.get(key) for key in ("d_model", "n_heads", "encoder_layers", "decoder_layers")},
        "languages": dict(zip(("source", "target"), model_languages(engine.tokenizer, engine.run_config))),
        "src_lang": cfg.src_lang,
        "tgt_lang": cfg.tgt_lang,
        "decode": {key: value for key, value in asdict(defaults).items() if key in DECODE_KEYS},
        "limits": {key: getattr(cfg, key) for key in
                   ("max_lines", "max_line_bytes", "max_request_bytes", "max_beam_size", "max_pending_lines")},
    }
