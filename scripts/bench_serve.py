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

Memory (``--rss-at 1000,5000,10000,20000``, instead of the table above): the server's resident memory
(VmRSS, Linux) at its first answer and once that many requests have been answered, each client
sending one line a request (the input's lines in turn) until the last count; for each search and
client count, with attnmt-serve's ``kernel_cache`` (256 compiled matmul kernels kept) and with torch's
own 1,024, the two interleaved; requests per second beside each.

    python scripts/bench_serve.py --ckpt runs/quickstart/checkpoints/best.pt
    python scripts/bench_serve.py --ckpt PATH --input test.de --lines 1000 --clients 1,8,32 --repeats 3
    python scripts/bench_serve.py --ckpt PATH --rss-at 1000,5000,10000,20000 --clients 1,16 --searches greedy

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
TORCH_KERNEL_CACHE = 1024  # what torch keeps in each without a setting


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
    parser.add_argument("--batching", choices=["per_call", "continuous"], default="per_call",
                        help="the server's batching= (default per_call, attnmt-serve's)")
    parser.add_argument("--timeout", type=positive, default=600, help="seconds one run may take (default 600)")
    parser.add_argument("--rss-at", type=positive_list, default=None,
                        help="measure memory instead: the server's RSS once this many requests are answered, "
                             "comma-separated (e.g. 1000,5000,10000,20000; Linux)")
    args = parser.parse_args(argv)
    if args.rss_at is not None:
        args.rss_at = sorted(set(args.rss_at))
        if not Path("/proc/self/status").is_file():
            parser.error("--rss-at reads the server's memory in /proc/PID/status, which this system has not")
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


def start_server(ckpt: Path, log, threads: int = 0, batching: str = "per_call",
                 kernel_cache: int | None = None) -> tuple[subprocess.Popen, int]:
    """``attnmt-serve`` on a free port (``kernel_cache``: its setting; None: the server's default)."""
    port = free_port()
    overrides = [f"ckpt={ckpt}", "device=cpu", f"port={port}", f"threads={threads}", f"batching={batching}"]
    if kernel_cache is not None:
        overrides.append(f"kernel_cache={kernel_cache}")
    from attnmt.model.linear import KERNEL_CACHES

    env = {name: value for name, value in os.environ.items() if name not in KERNEL_CACHES}  # the setting decides
    process = subprocess.Popen([sys.executable, "-m", "attnmt.cli.serve", *overrides], stdout=log,
                               stderr=subprocess.STDOUT, env=env)
    return process, port


def rss_mb(pid: int) -> float:
    """The resident memory of process ``pid`` in MB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


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


async def load_until(port: int, pid: int, lines: list[str], clients: int, decode: dict, counts: list[int],
                     timeout: float) -> tuple[list[float], float]:
    """The server's RSS (MB) once each of ``counts`` requests have been answered, ``clients`` clients
    sending one line a request (the lines in turn) until the last count; and the requests a second."""
    sent = iter(range(counts[-1]))
    answered = 0
    rss: list[float] = []

    async def client() -> None:
        nonlocal answered
        connection = Connection(port)
        try:
            for i in sent:
                status, answer = await connection.post("/translate", {"text": [lines[i % len(lines)]], **decode})
                if status != 200:
                    raise RuntimeError(f"request {i + 1}: HTTP {status}: {answer}")
                answered += 1
                if answered == counts[len(rss)]:
                    rss.append(rss_mb(pid))
        finally:
            connection.close()

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), timeout)
    return rss, counts[-1] / (time.perf_counter() - start)


def memory(args: argparse.Namespace) -> None:
    """The ``--rss-at`` table: the server's memory as requests are answered, with attnmt-serve's
    ``kernel_cache`` and with torch's own."""
    log = tempfile.TemporaryFile()
    runs: dict[tuple[str, int, int | None], list[tuple[float, list[float], float]]] = {}
    caches = (None, TORCH_KERNEL_CACHE)
    for repeat in range(args.repeats):
        for search in args.searches:
            for clients in args.clients:
                for cache in caches if repeat % 2 == 0 else caches[::-1]:
                    process, port = start_server(args.ckpt, log, args.threads, args.batching, cache)
                    try:
                        asyncio.run(first_answer(port, time.perf_counter() + args.timeout))
                        start = rss_mb(process.pid)
                        rss, rate = asyncio.run(load_until(port, process.pid, args.source_lines, clients,
                                                           SEARCHES[search], args.rss_at, args.timeout))
                    finally:
                        stop_server(process)
                    runs.setdefault((search, clients, cache), []).append((start, rss, rate))

    print(f"## attnmt-serve's memory: {args.ckpt}, one line a request ({len(args.source_lines)} lines of "
          f"{args.input.name} in turn), median of {args.repeats}, server threads={args.threads}, "
          f"batching={args.batching}")
    print(f"{machine()}, {datetime.now().strftime('%Y-%m-%d %H:%M')}\n")
    print("| search | clients | kernels kept | RSS at first answer | "
          + " | ".join(f"after {count:,}" for count in args.rss_at) + " | growth | requests/s |")
    print("|---|---:|---|---:|" + "---:|" * len(args.rss_at) + "---:|---:|")
    for search in args.searches:
        for clients in args.clients:
            for cache in caches:
                found = runs[search, clients, cache]
                start = statistics.median(run[0] for run in found)
                at = [statistics.median(run[1][i] for run in found) for i in range(len(args.rss_at))]
                rate = statistics.median(run[2] for run in found)
                kept = "attnmt-serve's kernel_cache" if cache is None else f"{cache} (torch's own)"
                print(f"| {search} | {clients} | {kept} | "
                      f"{start:.0f} MB | " + " | ".join(f"{mb:.0f} MB" for mb in at)
                      + f" | {at[-1] - start:+.0f} MB | {rate:.1f} |")


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
    if args.rss_at is not None:
        memory(args)
        return
    lines = args.source_lines
    log = tempfile.TemporaryFile()

    # Start-up to the first answer.
    starts = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        process, port = start_server(args.ckpt, log, args.threads, args.batching)
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
    process, port = start_server(args.ckpt, log, args.threads, args.batching)
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
          f"server threads={args.threads}, batching={args.batching}")
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
