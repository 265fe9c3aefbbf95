#!/usr/bin/env python3
"""attnmt-serve under load against attnmt-translate on the same lines, as a markdown table.

For each search (``--searches``: greedy, beam5) and each number of concurrent clients (``--clients``:
1, 8, 32), every client sends one sentence a request over its own keep-alive connection to a real
``attnmt-serve`` (uvicorn, a subprocess on 127.0.0.1), the next as soon as the last is answered,
until the lines are done. Reported: sentences per second, the median and 99th-percentile latency of a
request, and the ratio of the server's sentences per second to attnmt-translate's on the same lines
with the same search (the command's engine call on 512-line chunks, as ``attnmt-translate input=``
does, timed in a process of its own after loading: its start-up is not counted against it). Every
answer is checked against attnmt-translate's line. Beside each row: the engine alone on the same
lines, as many a call as there are clients, with the server's threads (all cores but one): the most
a server can reach with that many one-line clients, whose engine calls hold that many lines at most;
the lines per engine call the server made, and the share of the run its engine was busy.

The clients are a small asyncio HTTP/1.1 client in this process (one core's worth of Python at most):
on a 2-core machine they share the CPU with the server, so the ratio is what the server keeps of the
command's speed while its clients run beside it. Runs are interleaved (command, then each client
count; the next repetition in reverse order) and the table holds medians of ``--repeats`` runs.

Start-up: the seconds from starting ``attnmt-serve`` to its first answered translation (the median of
``--repeats`` starts).

    python scripts/bench_serve.py --ckpt runs/quickstart/checkpoints/best.pt
    python scripts/bench_serve.py --ckpt PATH --input test.de --lines 1000 --clients 1,8,32 --repeats 3

Needs ``pip install -e '.[serve]'``. See docs/BENCHMARKS.md for the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from _args import at_least, existing_file, positive, positive_list
from _machine import machine

REPO = Path(__file__).resolve().parents[1]
SEARCHES = {"greedy": {"beam_size": 1}, "beam5": {"beam_size": 5}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_input = Path(os.environ.get("ATTNMT_DATA", REPO.parent / "shared" / "data")) / "multi30k" / "test2016.de"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=existing_file, required=True, help="the checkpoint to serve")
    parser.add_argument("--input", type=existing_file, default=default_input,
                        help="source lines, one a line (default: Multi30k test2016.de under $ATTNMT_DATA)")
    parser.add_argument("--lines", type=positive, default=1000, help="lines translated per run (default 1000)")
    parser.add_argument("--clients", type=positive_list, default=[1, 8, 32],
                        help="concurrent clients, comma-separated (default 1,8,32)")
    parser.add_argument("--searches", default="greedy,beam5", help=f"of {', '.join(SEARCHES)} (default both)")
    parser.add_argument("--repeats", type=at_least(1), default=3, help="runs of each row; the table has medians")
    parser.add_argument("--threads", type=at_least(0), default=0,
                        help="the server's threads= (default 0: attnmt-serve's own, all cores but one)")
    parser.add_argument("--timeout", type=positive, default=600, help="seconds one run may take (default 600)")
    args = parser.parse_args(argv)
    args.searches = args.searches.split(",")
    unknown = [s for s in args.searches if s not in SEARCHES]
    if unknown:
        parser.error(f"--searches: unknown {', '.join(unknown)}; choose among {', '.join(SEARCHES)}")
    lines = [line for line in args.input.read_text(encoding="utf-8").splitlines() if line.strip()][: args.lines]
    if not lines:
        parser.error(f"--input {args.input} holds no lines")
    args.source_lines = lines
    return args


# The command's side: attnmt-translate's engine call in a process of its own.


def command_worker(ckpt: str, lines: list[str], threads: int, jobs: mp.Queue, results: mp.Queue) -> None:
    """Answers ``(search, chunk)`` jobs with ``(seconds, translations)``: ``chunk=0`` times the command's
    engine call (512-line chunks, torch's default threads, as attnmt-translate runs); ``chunk=N`` the
    engine alone on N lines a call in input order with the server's threads, the most a server can
    reach with N one-line clients, whose engine calls hold N lines at most."""
    import torch

    from attnmt.config import compose
    from attnmt.inference import open_engine
    from attnmt.serve import engine_threads

    engine = open_engine(compose("translate", [f"ckpt={ckpt}", "device=cpu"]), [ckpt], torch.device("cpu"))
    default_threads = torch.get_num_threads()
    server_threads = engine_threads(threads)  # the server's
    sources = engine.encode(lines)
    for search, chunk in iter(jobs.get, None):
        cfg = compose("translate", [f"ckpt={ckpt}", *(f"{k}={v}" for k, v in SEARCHES[search].items())])
        torch.set_num_threads(server_threads if chunk else default_threads)
        start = time.perf_counter()
        texts = []
        step = chunk or cfg.buffer_lines
        for first in range(0, len(lines), step):  # attnmt-translate input=FILE reads buffer_lines at a time
            if chunk:
                part = sources[first : first + chunk]
                texts += [t.texts[0] for t in engine.translate_sources(part, cfg, range(1, len(part) + 1))]
            else:
                texts += [t.texts[0] for t in engine.translate(lines[first : first + step], cfg, first_line=first + 1)]
        results.put((time.perf_counter() - start, texts))


# The server's side.


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(ckpt: Path, log, threads: int = 0) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "attnmt.cli.serve", f"ckpt={ckpt}", "device=cpu", f"port={port}",
                                f"threads={threads}"],
                               stdout=log, stderr=subprocess.STDOUT)
    return process, port


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and reads JSON answers: a lighter client than
    a general one, so that the clients take as little of the CPU as they can."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict) -> tuple[int, dict]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
        return status, json.loads(await self.reader.readexactly(length))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def first_answer(port: int, deadline: float) -> None:
    """Retry until the server translates one line."""
    while time.perf_counter() < deadline:
        connection = Connection(port)
        try:
            status, _ = await connection.post("/translate", {"text": ["Ein Hund."], "beam_size": 1})
            if status == 200:
                return
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            await asyncio.sleep(0.01)
        finally:
            connection.close()
    raise TimeoutError("attnmt-serve gave no answer in time")


async def load(port: int, lines: list[str], clients: int, decode: dict, timeout: float) -> tuple[float, list[float], list[str]]:
    """(wall seconds, each request's latency, each line's translation) with ``clients`` concurrent clients."""
    todo = iter(range(len(lines)))
    texts: list[str] = [""] * len(lines)
    latencies: list[float] = []

    async def client() -> None:
        connection = Connection(port)
        try:
            for i in todo:
                sent = time.perf_counter()
                status, answer = await connection.post("/translate", {"text": [lines[i]], **decode})
                latencies.append(time.perf_counter() - sent)
                if status != 200:
                    raise RuntimeError(f"line {i + 1}: HTTP {status}: {answer}")
                texts[i] = answer["translations"][0]
        finally:
            connection.close()

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), timeout)
    return time.perf_counter() - start, latencies, texts


async def health(port: int) -> dict:
    """The server's counters (``GET /health``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    answer = await reader.read()
    writer.close()
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    lines = args.source_lines
    log = tempfile.TemporaryFile()

    # Start-up to the first answer.
    starts = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        process, port = start_server(args.ckpt, log, args.threads)
        try:
            asyncio.run(first_answer(port, began + args.timeout))
            starts.append(time.perf_counter() - began)
        finally:
            stop_server(process)

    ctx = mp.get_context("spawn")
    jobs, results = ctx.Queue(), ctx.Queue()
    worker = ctx.Process(target=command_worker, args=(str(args.ckpt), lines, args.threads, jobs, results),
                        daemon=True)
    worker.start()
    process, port = start_server(args.ckpt, log, args.threads)
    command: dict[str, list[float]] = {s: [] for s in args.searches}
    alone: dict[tuple[str, int], list[float]] = {}
    served: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    mismatches: dict[tuple[str, int], int] = {}
    try:
        asyncio.run(first_answer(port, time.perf_counter() + args.timeout))
        for repeat in range(args.repeats):
            for search in args.searches:
                jobs.put((search, 0))
                seconds, reference = results.get(timeout=args.timeout)
                command[search].append(len(lines) / seconds)
                for clients in args.clients:
                    jobs.put((search, clients))
                    seconds, _ = results.get(timeout=args.timeout)
                    alone.setdefault((search, clients), []).append(len(lines) / seconds)
                order = args.clients if repeat % 2 == 0 else args.clients[::-1]
                for clients in order:
                    time.sleep(1.0)  # let the command's threads go idle
                    before = asyncio.run(health(port))
                    wall, latencies, texts = asyncio.run(load(port, lines, clients, SEARCHES[search], args.timeout))
                    after = asyncio.run(health(port))
                    calls = max(1, after["engine_calls"] - before["engine_calls"])
                    if after.get("engine_rows") is not None:  # continuous batching: rows a decoding step
                        per_call = (after["engine_rows"] - before["engine_rows"]) / calls
                    else:  # lines an engine call
                        per_call = (after["translated_lines"] - before["translated_lines"]) / calls
                    busy = (after["engine_seconds"] - before["engine_seconds"]) / wall
                    served.setdefault((search, clients), []).append(
                        (len(lines) / wall, percentile(latencies, 0.5), percentile(latencies, 0.99), per_call, busy))
                    mismatches[search, clients] = mismatches.get((search, clients), 0) + sum(
                        a != b for a, b in zip(texts, reference))
    finally:
        jobs.put(None)
        stop_server(process)
        worker.join(30)

    print(f"## attnmt-serve: {args.ckpt}, {len(lines)} lines of {args.input.name}, median of {args.repeats}, "
          f"server threads={args.threads}")
    print(f"{machine()}, {datetime.now().strftime('%Y-%m-%d %H:%M')}\n")
    print(f"start to first answer: {statistics.median(starts):.2f} s (runs: {', '.join(f'{s:.2f}' for s in starts)})\n")
    print("| search | clients | sentences/s | vs attnmt-translate | the engine alone, lines a call = clients | p50 ms | "
          "p99 ms | rows a step (engine=native), lines a call (others) | engine busy | answers equal to the command's |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for search in args.searches:
        cli = statistics.median(command[search])
        print(f"| {search} | attnmt-translate | {cli:.1f} | 1.00 | | | | | | |")
        for clients in args.clients:
            runs = served[search, clients]
            rate = statistics.median(r[0] for r in runs)
            p50 = statistics.median(r[1] for r in runs) * 1000
            p99 = statistics.median(r[2] for r in runs) * 1000
            per_call = statistics.median(r[3] for r in runs)
            busy = statistics.median(r[4] for r in runs)
            equal = len(lines) * len(runs) - mismatches[search, clients]
            ceiling = statistics.median(alone[search, clients])
            print(f"| {search} | {clients} | {rate:.1f} | {rate / cli:.2f} | {ceiling:.1f} ({ceiling / cli:.2f}) | "
                  f"{p50:.0f} | {p99:.0f} | {per_call:.1f} | {busy:.0%} | "
                  f"{equal}/{len(lines) * len(runs)} |")


if __name__ == "__main__":
    main()
