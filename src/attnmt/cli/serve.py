"""``attnmt-serve``: a checkpoint behind HTTP: ``POST /translate``, ``GET /health``, ``GET /info`` and a
page at ``/`` that translates what is typed and draws where the model looked.

    attnmt-serve ckpt=runs/quickstart/checkpoints/best.pt [engine=native] [host=127.0.0.1] [port=8000]
    curl -s localhost:8000/translate -H 'content-type: application/json' -d '{"text": ["Ein Hund rennt."]}'

The model is loaded once, before the port opens. Concurrent requests share the engine's batches
(:mod:`attnmt.serve.batcher`). SIGTERM or Ctrl-C stops taking connections, lets the requests in
flight finish for ``shutdown_timeout_s`` (30 s), cuts off what is left, then exits.
"""

from __future__ import annotations

import logging
import socket
import sys

import torch

from attnmt import install_hint
from attnmt.checkpoint import CheckpointError
from attnmt.cli.common import UserError, config_command, exit_at_once, setup_logging, to_config
from attnmt.config import ConfigError, ServeConfig
from attnmt.device import resolve_device
from attnmt.export import ExportError
from attnmt.inference import capabilities_of, check_capabilities, open_engine
from attnmt.model.linear import limit_kernel_cache
from attnmt.serve import engine_threads
from attnmt.tokenizer import TokenizerError

log = logging.getLogger("attnmt.serve")

USER_ERRORS = (CheckpointError, ConfigError, ExportError, TokenizerError)


def run(cfg: ServeConfig) -> None:
    cfg.check()
    check_capabilities(cfg.engine, capabilities_of(cfg.engine), cfg)  # before anything is loaded
    try:
        import uvicorn

        from attnmt.serve.app import create_app
    except ImportError as err:
        raise UserError(f"attnmt-serve needs FastAPI and uvicorn ({err}): {install_hint('serve')}") from None
    check_address(cfg.host, cfg.port)  # before the model loads: a typo in host= costs no minute of loading
    device = resolve_device(cfg.device, key="device")
    paths = [str(p) for p in cfg.ckpt] if isinstance(cfg.ckpt, (list, tuple)) else [str(cfg.ckpt)]
    torch.set_num_threads(engine_threads(cfg.threads))
    # Before the first matmul: the caches of compiled kernels take their size then.
    for name, value in limit_kernel_cache(cfg.kernel_cache).items():
        log.info("%s=%s from the environment sizes oneDNN's kernel cache, not kernel_cache=%d", name, value,
                 cfg.kernel_cache)
    # Default languages, where given, are checked now; without them each request names its direction
    # (a model of many languages, e.g. an imported M2M100, is served with none).
    engine = open_engine(cfg, paths, device, direction=cfg.src_lang is not None or cfg.tgt_lang is not None)
    app = create_app(engine, cfg, " + ".join(paths))
    log.info("serving %s with engine=%s on http://%s:%d (page at /, POST /translate)", " + ".join(paths),
             cfg.engine, cfg.host, cfg.port)
    # log_config=None: uvicorn's loggers go through attnmt's (one format on stderr). SIGTERM lets the
    # requests in flight finish for shutdown_timeout_s, then cancels what is left: a client that holds
    # a half-sent body cannot keep the server alive.
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_config=None, timeout_graceful_shutdown=cfg.shutdown_timeout_s)


def check_address(host: str, port: int) -> None:
    """Refuse, in one line, an address the server could not listen on: a host that is no address of
    this machine (or no address at all), or a port in use or not allowed.

    Raises:
        UserError: naming ``host=``/``port=`` and what the system said.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise UserError(f"host={host} is no address ({getattr(err, 'strerror', None) or err}); use an address of this "
                        "machine, e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every address)") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as err:
            raise UserError(f"host={host} port={port}: cannot listen there ({err.strerror}); choose another port= "
                            "or an address of this machine") from None


def main() -> None:
    setup_logging()
    config_command("serve", ServeConfig, lambda cfg: run(to_config(cfg)), sys.argv[1:], USER_ERRORS)


console_main = exit_at_once(main)  # attnmt-serve; tests call main() or run() in-process

if __name__ == "__main__":
    console_main()
