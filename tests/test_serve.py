"""attnmt-serve: the API in-process (FastAPI's test client), dynamic batching, bad requests, and a real
uvicorn on 127.0.0.1 under load and SIGTERM. The page's test in a browser is in test_serve_page.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import FIXTURE_CORPUS, compose, decode_config, free_port, native_engine

pytest.importorskip("fastapi", reason="attnmt-serve needs the serve extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the API tests need httpx: pip install -e '.[dev]'")

from fastapi.testclient import TestClient  # noqa: E402

from attnmt.config import ConfigError  # noqa: E402
from attnmt.serve.app import create_app  # noqa: E402

FIXTURE_LINES = (FIXTURE_CORPUS / "test.de").read_text(encoding="utf-8").splitlines()


def serve_config(ckpt: Path, *overrides: str):
    """The shipped attnmt-serve config (configs/serve.yaml) for ``ckpt`` with ``overrides``."""
    return compose("serve", [f"ckpt={ckpt}", "device=cpu", *overrides])


@pytest.fixture(scope="module")
def engine(trained_checkpoint):
    return native_engine(trained_checkpoint)


@pytest.fixture(scope="module")
def client(engine, trained_checkpoint):
    cfg = serve_config(trained_checkpoint, "max_lines=50", "max_line_bytes=2000", "max_request_bytes=20000")
    with TestClient(create_app(engine, cfg, "fixture")) as test_client:
        yield test_client


def cli_translations(engine, lines: list[str], **decode) -> list[str]:
    """What attnmt-translate writes for ``lines`` (its engine call, in this process)."""
    return [t.texts[0] for t in engine.translate(lines, decode_config(**decode))]


def test_every_decode_setting_but_the_servers_batching_budget_can_be_set_per_request() -> None:
    """A decode key added to DecodeConfig must be added to the request model too, with its type."""
    from typing import get_type_hints

    from attnmt.config import DecodeConfig
    from attnmt.serve.app import DECODE_KEYS, TranslateRequest

    decode = get_type_hints(DecodeConfig)
    request = {name: field.annotation for name, field in TranslateRequest.model_fields.items()}
    assert set(decode) - set(request) == {"max_tokens"}  # the server's own batches
    assert {name: request[name] for name in DECODE_KEYS} == {name: decode[name] | None for name in DECODE_KEYS}
    assert set(DECODE_KEYS) == set(decode) - {"max_tokens"}


def test_translations_equal_the_command_lines_in_order(client, engine) -> None:
    lines = [FIXTURE_LINES[3], "", FIXTURE_LINES[0], "   ", FIXTURE_LINES[7]]
    for decode in ({}, {"beam_size": 1}, {"beam_size": 3, "len_penalty": 0.6}):
        answer = client.post("/translate", json={"text": lines, **decode})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["translations"] == cli_translations(engine, lines, **decode)
        assert body["translations"][1] == body["translations"][3] == ""
        assert len(body["scores"]) == len(lines) and "nbest" not in body


def test_nbest_lists_and_scores_equal_the_engines(client, engine) -> None:
    lines = FIXTURE_LINES[:3]
    body = client.post("/translate", json={"text": lines, "beam_size": 4, "nbest": 3}).json()
    expected = engine.translate(lines, decode_config(beam_size=4, nbest=3))
    assert [[c["text"] for c in line] for line in body["nbest"]] == [t.texts for t in expected]
    assert [[c["score"] for c in line] for line in body["nbest"]] == [[round(s, 4) for s in t.scores] for t in expected]
    assert body["translations"] == [t.texts[0] for t in expected]


def test_attention_maps_are_the_models_for_each_layer_and_head(client, engine) -> None:
    lines = [FIXTURE_LINES[2], ""]
    body = client.post("/translate", json={"text": lines, "attention": True, "beam_size": 1}).json()
    maps, empty = body["attention"]
    assert empty is None
    model = engine.backend.model
    weights = maps["weights"]  # [layer][head][target][source]
    tokens = engine.translate(lines[:1], decode_config(beam_size=1))[0].tokens[0]
    assert maps["tgt_pieces"] == engine.tokenizer.tgt_pieces(tokens + [engine.tokenizer.eos_id])
    assert maps["src_pieces"] == engine.tokenizer.src_pieces(engine.encode(lines[:1])[0])
    assert len(weights) == len(model.decoder_layers) and {len(layer) for layer in weights} == {model.cfg.n_heads}
    assert {len(head) for layer in weights for head in layer} == {len(maps["tgt_pieces"])}
    assert {len(row) for layer in weights for head in layer for row in head} == {len(maps["src_pieces"])}
    for row in (row for layer in weights for head in layer for row in head):
        assert sum(row) == pytest.approx(1.0, abs=1e-3)  # each target piece's attention is a distribution
    # The weights are the ones the model used: applied to each layer's values, they give the output its
    # cross-attention computed while decoding the translation (captured from the layer itself).
    src = torch.tensor([engine.encode(lines[:1])[0]])
    src_mask = torch.ones_like(src, dtype=torch.bool)
    outputs = []
    hooks = [layer.cross_attn.register_forward_hook(lambda _m, _args, out: outputs.append(out))
             for layer in model.decoder_layers]
    try:
        with torch.inference_mode():
            memory = model.encode(src, src_mask)
            model.decode(torch.tensor([[model.cfg.bos_id, *tokens]]), memory, src_mask)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.inference_mode():
        for layer, maps_of_layer, output in zip(model.decoder_layers, weights, outputs):
            attn = layer.cross_attn
            _, values = attn.project_kv(memory)  # (1, H, S, Dh)
            context = (torch.tensor(maps_of_layer)[None] @ values).transpose(1, 2).flatten(2)  # (1, T, D)
            torch.testing.assert_close(attn.out_proj(context), output, atol=2e-3, rtol=0)


BAD_REQUESTS = [
    # (body bytes, status, field)
    (b'{"text": ["Ein Hund."', 400, "body"),
    (b"\xff\xfe not utf-8", 400, "body"),
    (b'{"text": ["Ein Hund."], "beam_size": NaN}', 400, "body"),
    (b'{"text": ["Ein Hund."], "len_penalty": 1e999}', 422, "len_penalty"),
    (b'["Ein Hund."]', 422, "body"),
    (b'{}', 422, "text"),
    (b'{"text": "Ein Hund."}', 422, "text"),
    (b'{"text": []}', 422, "text"),
    (b'{"text": ["Ein Hund.", 7]}', 422, "text[1]"),
    (b'{"text": ["Ein Hund.", "\\ud800 lone"]}', 422, "text[1]"),
    (b'{"text": ["Ein Hund."], "tgt_lang": "\\ud800"}', 422, "tgt_lang"),  # echoed by no message: once a 500
    (b'{"text": ["Ein Hund."], "src_lang": "de\\udfff"}', 422, "src_lang"),
    (b'{"text": ["Ein Hund."], "beam_size": "5"}', 422, "beam_size"),
    (b'{"text": ["Ein Hund."], "beam_size": 5.0}', 422, "beam_size"),
    (b'{"text": ["Ein Hund."], "beam_size": 0}', 422, "beam_size"),
    (b'{"text": ["Ein Hund."], "beam_size": 100000}', 422, "beam_size"),
    (b'{"text": ["Ein Hund."], "beam_size": 2, "nbest": 3}', 422, "nbest"),
    (b'{"text": ["Ein Hund."], "top_p": 0}', 422, "top_p"),
    (b'{"text": ["Ein Hund."], "temperature": -1.5}', 422, "temperature"),
    (b'{"text": ["Ein Hund."], "beam_stop": "never"}', 422, "beam_stop"),
    (b'{"text": ["Ein Hund."], "seed": -1}', 422, "seed"),
    (b'{"text": ["Ein Hund."], "max_len_b": 1' + b"0" * 400 + b'}', 422, "max_len_b"),
    (b'{"text": ["Ein Hund."], "max_len_a": -1}', 422, "max_len_a"),
    (b'{"text": [' + (b'"' + b"Ein Hund rennt. " * 15 + b'", ') * 49 + b'"Ein Hund."], "attention": true}', 413,
     "attention"),
    (b'{"text": ["Ein Hund."], "max_tokens": 1}', 422, "max_tokens"),
    (b'{"text": ["Ein Hund."], "tgt_lang": "fr"}', 422, "tgt_lang"),
    (b'{"text": ["Ein Hund."], "src_lang": "ja"}', 422, "src_lang"),
    (b'{"text": ["Ein Hund."], "attention": "yes"}', 422, "attention"),
    (b'{"text": [' + b'"a", ' * 50 + b'"b"]}', 413, "text"),
    (b'{"text": ["' + "ü".encode() * 1001 + b'"]}', 413, "text[0]"),
    (b'{"text": ["' + b"a" * 30000 + b'"]}', 413, None),
]


@pytest.mark.parametrize(("body", "status", "field"), BAD_REQUESTS, ids=range(len(BAD_REQUESTS)))
def test_a_bad_request_is_answered_with_its_field_and_the_service_goes_on(client, body, status, field) -> None:
    answer = client.post("/translate", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    error = answer.json()
    assert error["field"] == field and error["error"]
    assert client.post("/translate", json={"text": [FIXTURE_LINES[0]], "beam_size": 1}).status_code == 200


def test_health_info_and_page(client, engine) -> None:
    assert client.get("/health").json()["status"] == "ok"
    info = client.get("/info").json()
    assert info["engine"] == "native" and info["attention"] is True
    assert info["languages"] == {"source": ["de"], "target": ["en"]}
    assert info["decode"]["beam_size"] == decode_config().beam_size
    assert info["architecture"]["decoder_layers"] == len(engine.backend.model.decoder_layers)
    assert info["limits"]["max_lines"] == 50
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<textarea id="source"' in page.text
    assert client.get("/nowhere").json()["error"] == "Not Found"


async def _concurrently(app, bodies: list[dict]) -> list[dict]:
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            answers = await asyncio.gather(*(http.post("/translate", json=body) for body in bodies))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    return [a.json() for a in answers]


@pytest.mark.parametrize("batching", ["continuous", "per_call"])
def test_concurrent_requests_share_engine_calls_and_get_their_own_answers(engine, trained_checkpoint,
                                                                          batching: str) -> None:
    app = create_app(engine, serve_config(trained_checkpoint, "batch_wait_ms=50", f"batching={batching}"), "fixture")
    lines = FIXTURE_LINES[:24]
    bodies = [{"text": [line], "beam_size": 1} for line in lines]
    bodies += [{"text": lines[i : i + 3], "beam_size": 2} for i in range(0, 12, 3)]
    # Sampling: a request's draws are those of its own line numbers, whoever it shares a batch with.
    bodies += [{"text": lines[:2], "sampling": True, "nbest": 2, "seed": 7}] * 2
    answers = asyncio.run(_concurrently(app, bodies))
    single = cli_translations(engine, lines, beam_size=1)
    assert [a["translations"][0] for a in answers[:24]] == single
    beam = cli_translations(engine, lines[:12], beam_size=2)
    assert [t for a in answers[24:28] for t in a["translations"]] == beam
    sampled = engine.translate(lines[:2], decode_config(sampling=True, nbest=2, seed=7))
    for answer in answers[28:]:
        assert [[c["text"] for c in line] for line in answer["nbest"]] == [t.texts for t in sampled]
    batcher = app.state.batcher
    if batching == "per_call":
        calls = batcher.engine_calls
        assert calls <= 6, f"{len(bodies)} concurrent requests took {calls} engine calls: they were not batched"
    else:  # a step decodes the rows of every request in flight: 24 + 12 x 2 + 2 x 2 x 2 at the first
        rows = batcher.engine_rows / batcher.engine_calls
        assert rows > 8, f"{len(bodies)} concurrent requests: {rows:.1f} rows a step, they did not share steps"


def test_gather_tokens_bounds_what_one_engine_call_takes_whatever_the_wait(engine, trained_checkpoint) -> None:
    # Each request holds more source tokens than gather_tokens=1: each is an engine call of its own,
    # started at once, although the requests arrive together and may wait 50 ms for each other.
    app = create_app(engine, serve_config(trained_checkpoint, "batch_wait_ms=50", "gather_tokens=1"), "fixture")
    lines = FIXTURE_LINES[:6]
    answers = asyncio.run(_concurrently(app, [{"text": [line], "beam_size": 1} for line in lines]))
    assert [a["translations"][0] for a in answers] == cli_translations(engine, lines, beam_size=1)
    assert app.state.batcher.engine_calls == len(lines)


@pytest.mark.parametrize("batching", ["continuous", "per_call"])
def test_a_full_queue_answers_503_and_a_gone_client_costs_nothing(engine, trained_checkpoint, monkeypatch,
                                                                  batching: str) -> None:
    from attnmt.inference.native import NativeRunningSearch

    app = create_app(engine, serve_config(trained_checkpoint, "max_pending_lines=4", "batch_wait_ms=0",
                                          f"batching={batching}"), "fixture")
    batcher = app.state.batcher
    busy, release = threading.Event(), threading.Event()
    work = NativeRunningSearch.step if batching == "continuous" else engine.translate_sources

    def held(*args, **kwargs):  # the engine busy until the test lets it go
        busy.set()
        release.wait(10)
        return work(*args, **kwargs)

    async def scenario() -> tuple[int, list[int], int]:
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                first = asyncio.ensure_future(http.post("/translate", json={"text": FIXTURE_LINES[:1], "beam_size": 1}))
                while not busy.is_set():
                    await asyncio.sleep(0.01)  # until the first request is in the engine
                queued = asyncio.ensure_future(http.post("/translate", json={"text": FIXTURE_LINES[1:4], "beam_size": 1}))
                gone = asyncio.ensure_future(gone_client(app, {"text": [FIXTURE_LINES[4]], "beam_size": 1}))
                await asyncio.sleep(0.1)
                refused = await http.post("/translate", json={"text": FIXTURE_LINES[5:7], "beam_size": 1})
                await gone
                release.set()
                answers = [await first, await queued]
        assert refused.headers["retry-after"] == "1"
        return refused.status_code, [a.status_code for a in answers], batcher.translated_lines

    if batching == "continuous":
        monkeypatch.setattr(NativeRunningSearch, "step", held)
    else:
        monkeypatch.setattr(engine, "translate_sources", held)
    refused, statuses, translated = asyncio.run(scenario())
    assert refused == 503 and statuses == [200, 200]
    assert translated == 4, "the disconnected client's line was translated all the same"


async def gone_client(app, body: dict) -> None:
    """A client that sends its request and disconnects before the answer (raw ASGI)."""
    data = json.dumps(body).encode()
    messages = [{"type": "http.request", "body": data, "more_body": False}]
    left = asyncio.Event()

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.sleep(0.05)
        left.set()
        return {"type": "http.disconnect"}

    async def send(message):
        pass

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/translate", "raw_path": b"/translate", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}
    await app(scope, receive, send)
    assert left.is_set()


# A real server: uvicorn in a subprocess, on 127.0.0.1 only.


class Server:
    """``attnmt-serve`` as a subprocess on a free port of 127.0.0.1; stopped with SIGTERM."""

    def __init__(self, ckpt: Path, *overrides: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.started = time.perf_counter()
        # The log to a file, not a pipe: a pipe nobody reads fills up with access lines and stalls the server.
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "attnmt.cli.serve", f"ckpt={ckpt}", "device=cpu", f"port={self.port}", *overrides],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 60) -> float:
        """Seconds from the start until /health answered."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"attnmt-serve exited: {self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError("attnmt-serve did not answer /health in time")

    def stop(self, timeout: float = 60) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return self.process.returncode, self.output()


@pytest.fixture
def server(trained_checkpoint):
    servers: list[Server] = []

    def start(*overrides: str) -> Server:
        servers.append(Server(trained_checkpoint, *overrides))
        servers[-1].wait_ready()
        return servers[-1]

    yield start
    for running in servers:
        running.stop()


async def load(url: str, bodies: list[dict], clients: int, timeout: float) -> list[dict]:
    """POST ``bodies`` from ``clients`` concurrent keep-alive connections; the answers in order."""
    answers: list[dict | None] = [None] * len(bodies)
    todo = iter(range(len(bodies)))
    deadline = time.perf_counter() + timeout

    async def client(http: httpx.AsyncClient) -> None:
        for i in todo:
            assert time.perf_counter() < deadline, "the load test ran out of time"
            answer = await http.post(f"{url}/translate", json=bodies[i])
            assert answer.status_code == 200, answer.text
            answers[i] = answer.json()

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return answers


@pytest.mark.parametrize("batching", ["continuous", "per_call"])
def test_under_load_every_answer_equals_the_command_lines(server, engine, multi30k, batching: str) -> None:
    lines = (multi30k / "valid.de").read_text(encoding="utf-8").splitlines()[:250]
    running = server(f"batching={batching}")
    requests = 4 * len(lines)
    # Each line four times, one of them (a different pass for neighbouring lines) with beam search:
    # requests of both settings are in flight together.
    bodies = [{"text": [lines[i % len(lines)]], "beam_size": 5 if (i % len(lines) + i // len(lines)) % 4 == 3 else 1}
              for i in range(requests)]
    answers = asyncio.run(load(running.url, bodies, clients=32, timeout=240))
    expected = {1: cli_translations(engine, lines, beam_size=1), 5: cli_translations(engine, lines, beam_size=5)}
    wrong = [i for i, (body, answer) in enumerate(zip(bodies, answers))
             if answer["translations"][0] != expected[body["beam_size"]][i % len(lines)]]
    assert not wrong, f"{len(wrong)} of {requests} answers differ from attnmt-translate's, e.g. request {wrong[0]}"
    health = httpx.get(f"{running.url}/health").json()
    assert health["translated_lines"] == requests
    if batching == "continuous":  # a step decodes the rows of the lines in flight (up to 32 x 5 here)
        assert health["engine_rows"] / health["engine_calls"] > 8, "32 concurrent clients should share steps"
    else:
        assert health["engine_calls"] < requests / 4, "32 concurrent clients should share engine calls"


def test_sigterm_finishes_the_requests_in_flight_then_exits(server) -> None:
    running = server()
    body = {"text": FIXTURE_LINES * 4, "beam_size": 16}  # about a second of work

    def send() -> httpx.Response:
        return httpx.post(f"{running.url}/translate", json=body, timeout=60)

    thread_answers: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: thread_answers.append(send()))
    sender.start()
    while httpx.get(f"{running.url}/health").json()["pending_lines"] == 0 and \
            httpx.get(f"{running.url}/health").json()["engine_calls"] == 0:
        time.sleep(0.01)
    status, log = running.stop()
    sender.join(60)
    assert thread_answers and thread_answers[0].status_code == 200, log
    assert len(thread_answers[0].json()["translations"]) == len(body["text"])
    # uvicorn ends by raising the signal it caught again, once drained: the parent sees SIGTERM's status.
    assert status in (0, -signal.SIGTERM) and "Application shutdown complete" in log, log
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{running.url}/health", timeout=2)


def test_the_command_refuses_what_it_cannot_serve_in_one_line(trained_checkpoint, tmp_path, monkeypatch, capsys,
                                                              restore_logging) -> None:
    from attnmt.cli import serve

    def refused(*args: str) -> str:
        monkeypatch.setattr(sys, "argv", ["attnmt-serve", *args])
        with pytest.raises(SystemExit) as stop:
            serve.main()
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert stop.value.code == 2 and error.startswith("attnmt-serve: error: "), error
        return error

    assert "none.pt" in refused(f"ckpt={tmp_path / 'none.pt'}")
    assert "max_lines=0 must be at least 1" in refused(f"ckpt={trained_checkpoint}", "max_lines=0")
    assert "did you mean port" in refused(f"ckpt={trained_checkpoint}", "prot=8000")
    assert "tgt_lang=fr: this model translates into en only" in refused(f"ckpt={trained_checkpoint}", "tgt_lang=fr")
    assert "beam_size=40 exceeds max_beam_size=16" in refused(f"ckpt={trained_checkpoint}", "beam_size=40")
    # An address it cannot listen on, refused before the model loads (a missing checkpoint is not even read).
    assert "host=256.0.0.1 is no address" in refused(f"ckpt={tmp_path / 'none.pt'}", "host=256.0.0.1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert f"port={port}: cannot listen there" in refused(f"ckpt={tmp_path / 'none.pt'}", f"port={port}")


def test_a_client_gone_mid_search_frees_its_rows_at_the_next_step(engine) -> None:
    from attnmt.serve.batcher import Job, RunningBatcher

    # min_len keeps every line going for 100 steps: far longer than the test waits.
    cfg = decode_config(beam_size=8, min_len=100, max_len_a=0.0, max_len_b=120)

    async def scenario() -> tuple[int, int, int, int]:
        batcher = RunningBatcher(engine, max_rows=1024, max_pending_lines=100)
        batcher.start()
        future = batcher.submit(Job(engine.encode(FIXTURE_LINES[:8]), cfg))
        while batcher.engine_calls < 3:
            await asyncio.sleep(0.002)
        rows = batcher.engine_rows / batcher.engine_calls
        future.cancel()  # what answer_unless_gone does when the client disconnects
        decoded = batcher.engine_rows
        await asyncio.sleep(0.3)
        decoded_after = batcher.engine_rows
        await batcher.stop()
        return rows, decoded, decoded_after, batcher.translated_lines

    rows, decoded, decoded_after, translated = asyncio.run(scenario())
    assert rows == 8 * 8  # the eight lines were being decoded, beam_size rows each
    # At most the step under way when the client left decoded its rows; the next ones had none.
    assert decoded_after - decoded <= 8 * 8, f"{decoded_after - decoded} rows decoded after the client left"
    assert translated == 0


def test_sigterm_ends_the_server_within_its_grace_whatever_a_client_does(server) -> None:
    running = server("shutdown_timeout_s=2")
    sock = socket.create_connection(("127.0.0.1", running.port))
    try:  # a body announced as 1000 bytes, of which a few are sent, and then nothing
        sock.sendall(b"POST /translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"text\": [\"Ein")
        time.sleep(1.0)
        started = time.perf_counter()
        status, log = running.stop(timeout=30)
        assert time.perf_counter() - started < 2 + 10, log
        assert status in (0, -signal.SIGTERM), log
    finally:
        sock.close()


def test_sigterm_ends_the_server_within_its_grace_while_a_client_leaves_a_large_answer_unread(server, multi30k) -> None:
    """The other client that could hold a server: one that asks for megabytes (the attention maps of
    many lines) and never reads them, so that the server's write waits; the grace ends it too."""
    running = server("shutdown_timeout_s=2")
    # 150 lines: about 12 MB of maps, within the 4 million weights a request may ask for.
    lines = (multi30k / "valid.de").read_text(encoding="utf-8").splitlines()[:150]
    body = json.dumps({"text": lines, "attention": True}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the answer stays on the server
    sock.connect(("127.0.0.1", running.port))
    try:
        sock.sendall(b"POST /translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.perf_counter() + 60
        while httpx.get(f"{running.url}/health", timeout=10).json()["translated_lines"] < len(lines):
            assert time.perf_counter() < deadline, "the request was not translated in time"
            time.sleep(0.1)
        time.sleep(1.0)  # its answer is being written, and waits for a reader
        started = time.perf_counter()
        status, log = running.stop(timeout=30)
        assert time.perf_counter() - started < 2 + 10, log
        assert status in (0, -signal.SIGTERM), log
        # The write was waiting (the test made the case it means to): uvicorn cut it off at the grace.
        assert "timeout graceful shutdown exceeded" in log, log
    finally:
        sock.close()


def test_a_client_gone_while_sending_its_body_is_one_line_not_a_traceback(server) -> None:
    running = server()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", running.port)) as sock:
            sock.sendall(b"POST /translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"text\": [\"Ein")
            time.sleep(0.2)
    assert httpx.post(f"{running.url}/translate", json={"text": ["Ein Hund."]}, timeout=30).status_code == 200
    _, log = running.stop()
    assert log.count("disconnected before its request was read") == 3, log
    assert "Traceback" not in log and "ClientDisconnect" not in log, log


def test_serve_sizes_the_kernel_cache_before_the_model_runs(trained_checkpoint, monkeypatch) -> None:
    """kernel_cache= reaches oneDNN only if set before the first matmul: before the engine opens."""
    import uvicorn

    from attnmt.cli import serve as serve_command
    from attnmt.model import linear

    for name in linear.KERNEL_CACHES:
        monkeypatch.delenv(name, raising=False)
    seen = []
    open_engine = serve_command.open_engine
    monkeypatch.setattr(serve_command, "open_engine", lambda *args, **kwargs: seen.append(
        [os.environ.get(name) for name in linear.KERNEL_CACHES]) or open_engine(*args, **kwargs))
    monkeypatch.setattr(uvicorn, "run", lambda app, **settings: None)
    serve_command.run(serve_config(trained_checkpoint, "threads=1", "kernel_cache=32"))
    assert seen == [["32", "32"]]
    with pytest.raises(ConfigError, match="kernel_cache=0 must be at least 1"):
        serve_command.run(serve_config(trained_checkpoint, "kernel_cache=0"))


def test_a_model_of_many_languages_is_served_without_default_languages(tmp_path, multi30k, monkeypatch,
                                                                       one_thread) -> None:
    """An imported M2M100 starts with no src_lang=/tgt_lang=; a request names its direction, or gets a 422."""
    pytest.importorskip("transformers", reason="attnmt-import needs the hf extra: pip install -e '.[hf]'")
    import uvicorn

    import hf_models
    from attnmt.cli import serve as serve_command
    from attnmt.pretrained import import_model, save

    model, tokenizer = import_model(hf_models.m2m_100(multi30k, tmp_path / "m2m"))
    ckpt = save(model, tokenizer, tmp_path / "m2m.pt", "test")
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **settings: apps.append(app))
    serve_command.run(serve_config(ckpt, "threads=1"))  # as attnmt-serve ckpt=m2m.pt, up to the port
    with TestClient(apps[0]) as client:
        refused = client.post("/translate", json={"text": ["Ein Hund läuft."]})
        assert refused.status_code == 422 and refused.json()["field"] == "tgt_lang"
        assert "name the direction with src_lang= and tgt_lang=" in refused.json()["error"]
        named = client.post("/translate", json={"text": ["Ein Hund läuft."], "src_lang": "de", "tgt_lang": "en"})
        assert named.status_code == 200 and len(named.json()["translations"]) == 1
