"""What the command-line entry points share: logging to stderr, one-line errors, line input.

Errors that a user can fix (a missing file, a bad checkpoint, mismatched inputs) end the command
with one line on stderr naming the problem and a non-zero exit status, not a stack trace.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from attnmt import durable

log = logging.getLogger(__name__)


class UserError(Exception):
    """A problem with the command's input that the user can fix; printed as one line."""


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines to stderr, so stdout carries nothing but the command's output."""
    logging.basicConfig(stream=sys.stderr, level=level, format="%(levelname)s %(name)s: %(message)s", force=True)


def run_command(name: str, body: Callable[[], None], user_errors: tuple[type[BaseException], ...] = ()) -> None:
    """Run ``body``; turn a user-fixable error into ``NAME: error: MESSAGE`` and exit status 2."""
    try:
        body()
    except BrokenPipeError:  # e.g. `attnmt-translate ... | head`: the reader has gone, nothing to report
        sys.stderr.close()
        sys.exit(0)
    except (UserError, OSError, UnicodeDecodeError, *user_errors) as err:  # OSError: a path that cannot be opened
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(2)


def exit_at_once(main: Callable[[], None]) -> Callable[[], None]:
    """``main`` for a console script, which ends the process as soon as ``main`` has returned: the
    output flushed and closed, without the interpreter's teardown, which after ``import torch`` takes
    half a second a command (measured: 1.95 s for ``python -c "import torch"``, 1.5 s with this)."""

    def run() -> None:
        code = 0
        try:
            main()
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if not isinstance(stop.code, (int, type(None))):
                print(stop.code, file=sys.stderr)
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe (| head): nothing left to say
                pass
        os._exit(code)

    return run


def compose_cli(name: str, schema: type, overrides: list[str]) -> DictConfig | None:
    """What Hydra composes for ``configs/NAME.yaml`` with command-line ``overrides``, without Hydra's
    start-up (plugins, its own config tree, logging and run-directory set-up), for commands that must
    start fast.

    The overrides are ``key=value`` in Hydra's grammar (Hydra's own parser reads them). The config's
    defaults list may hold its schema, ``group@_here_: option`` entries (whose option files may list
    options of the same group) and ``_self_``, merged in that order, as Hydra does. Returns None
    where the command line or the config file needs Hydra itself: flags such as ``--help`` or
    ``--cfg``, ``hydra.*`` keys, ``+``, ``~`` or ``@package`` overrides, or a defaults list of
    another form.

    Raises:
        UserError: an override that does not parse, names no key of the config (the closest keys
            are named), or gives a value of the wrong type; one line each.
    """
    if any(arg.startswith("-") for arg in overrides):
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import OverrideParseException

    from attnmt.config import config_dir

    parser = OverridesParser.create()
    parsed = []
    for arg in overrides:
        try:
            (override,) = parser.parse_overrides([arg])
        except OverrideParseException as err:
            raise UserError(f"{arg}: {str(err).splitlines()[0]}") from None
        if override.is_sweep_override():
            raise UserError(f"{arg}: one value per key; write a list as {override.key_or_group}=[a,b] "
                            f"and quote a value with commas: {override.key_or_group}='a,b'")
        if override.type != OverrideType.CHANGE or override.package is not None or override.key_or_group.split(".")[0] == "hydra":
            return None
        parsed.append(override)

    root = config_dir()
    layers = _config_layers(root, None, name)
    if layers is None:
        return None
    cfg = OmegaConf.structured(schema)
    for path, values in layers:
        try:
            cfg = OmegaConf.merge(cfg, values)
        except OmegaConfBaseException as err:
            raise UserError(f"{path}: {str(err).splitlines()[0]}") from None
    apply_overrides(cfg, parsed, name)
    return cfg


def config_command(name: str, schema: type, run: Callable[[DictConfig], None], argv: list[str],
                   user_errors: tuple[type[BaseException], ...] = ()) -> None:
    """The command line of ``attnmt-NAME``, the same for every command with a ``configs/NAME.yaml``:
    ``key=value`` overrides composed without Hydra's start-up (:func:`compose_cli`: a misspelt key
    or a value of the wrong type is one line naming it), and under Hydra itself what needs it
    (``--help``, ``--cfg``, ``hydra.*`` keys, ``+``/``~`` overrides); then ``run(cfg)``, with
    ``user_errors`` one line each (:func:`run_command`)."""
    command = f"attnmt-{name}"

    def body() -> None:
        cfg = compose_cli(name, schema, argv)
        if cfg is not None:
            run(cfg)
            return
        import hydra  # imported only here: its start-up costs more than the rest of a command's

        from attnmt.config import config_dir, register_configs

        register_configs()

        @hydra.main(config_path=str(config_dir()), config_name=name, version_base="1.3")
        def under_hydra(cfg: DictConfig) -> None:
            run_command(command, lambda: run(cfg), user_errors)

        sys.argv[1:] = [*argv, f"hydra.job.name={command}"]  # else Hydra names the app after this file
        under_hydra()

    run_command(command, body, user_errors)


def unknown_key(argument: str, key: str, known: list[str], where: str) -> UserError:
    """The one line of every command for ``argument`` naming a key ``where`` does not have: the closest
    of the ``known`` keys ("did you mean"), then all of them."""
    close = difflib.get_close_matches(key, known, n=2)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return UserError(f"{argument}: {where} has no key {key!r}; {hint}the keys are {', '.join(known)}")


def apply_overrides(cfg: DictConfig, overrides: list, name: str) -> None:
    """Set each of Hydra's parsed ``overrides`` (``key=value``) in ``cfg``, as Hydra would.

    Raises:
        UserError: a key that ``NAME.yaml`` does not have (the closest keys named: "did you mean"), or
            a value of the wrong type; one line each.
    """
    for override in overrides:
        key = override.key_or_group
        try:
            OmegaConf.update(cfg, key, override.value(), merge=True)
        except (ConfigAttributeError, ConfigKeyError):
            parent, _, _ = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            known = sorted(f"{parent}.{k}" if parent else str(k) for k in node) if isinstance(node, DictConfig) else []
            raise unknown_key(override.input_line, key, known, f"{name}.yaml") from None
        except (OmegaConfBaseException, ValueError) as err:
            hint = ""
            if isinstance(OmegaConf.select(cfg, key), ListConfig) and isinstance(override.value(), str):
                hint = f"; {key} is a list: write {key}=[{override.value()}]"
            raise UserError(f"{override.input_line}: {str(err).splitlines()[0].rstrip('.')}{hint}") from None


def _config_layers(root: Path, group: str | None, name: str) -> list[tuple[Path, DictConfig]] | None:
    """The files and values merged over the schema for config ``name`` (an option of ``group``, or the
    primary config ``NAME.yaml`` with the schema ``NAME_schema`` first in its defaults list), in
    Hydra's order; None for a defaults list :func:`compose_cli` leaves to Hydra."""
    path = root / (group or "") / f"{name}.yaml"
    values = OmegaConf.load(path)
    values.pop("hydra", None)
    defaults = list(values.pop("defaults", ["_self_"]))
    if group is None:
        if not defaults or defaults.pop(0) != f"{name}_schema":
            return None
    layers: list[tuple[Path, DictConfig]] | None = []
    for entry in defaults:
        inner: list[tuple[Path, DictConfig]] | None = None
        if entry == "_self_":
            inner = [(path, values)]
        elif isinstance(entry, str) and group is not None:  # another option of the same group
            inner = _config_layers(root, group, entry)
        elif isinstance(entry, DictConfig) and len(entry) == 1:
            ((key, option),) = entry.items()
            if str(key).startswith("override hydra/"):
                continue
            if group is None and str(key).endswith("@_here_") and isinstance(option, str):
                inner = _config_layers(root, str(key).removesuffix("@_here_"), option)
        if inner is None:
            return None
        layers.extend(inner)
    return layers if any(v is values for _, v in layers) else None


def to_config(cfg: DictConfig, required: tuple[str, ...] = ("ckpt",)):
    """The composed config as its dataclass, after checking that the ``required`` keys were given."""
    for key in required:
        if OmegaConf.is_missing(cfg, key):
            raise UserError(f"{key}= is required, e.g. {key}=runs/multi30k_de_en/checkpoints/best.pt")
    return OmegaConf.to_object(cfg)


def take_arguments(argv: list[str], prefix: str) -> tuple[list[str], list[str]]:
    """Split ``argv`` into ``(the other arguments, those starting with prefix)``, order kept.

    For the arguments a command reads itself before Hydra sees the rest: ``text=`` sentences, which
    Hydra's override grammar would parse (quotes, brackets, ``${``, a trailing backslash), and
    ``data.KEY=VALUE`` items of attnmt-evaluate, which override a checkpoint's data config.
    """
    rest, taken = [], []
    for arg in argv:
        (taken if arg.startswith(prefix) else rest).append(arg)
    return rest, taken


def iter_lines(stream: BinaryIO, name: str) -> Iterator[str]:
    """Lines of a byte stream decoded as UTF-8, without their line ends, read lazily.

    Raises:
        UserError: naming ``name`` and the line number, on bytes that are not UTF-8.
    """
    for number, raw in enumerate(stream, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(
                f"{name} line {number}: invalid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                "convert the file to UTF-8, e.g. with iconv -f latin1 -t utf-8"
            ) from None
        yield line.rstrip("\n").rstrip("\r")


def open_input(path: str) -> BinaryIO:
    """A readable binary file, with a one-line error where it is missing or unreadable."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"input file {path} does not exist (or is not a file)")
    try:
        return p.open("rb")
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None


@contextlib.contextmanager
def output_file(path: str, key: str, inputs: dict[str, str | list | None]) -> Iterator[TextIO]:
    """A text file for a command's output, which replaces ``path`` only once the command has written
    all of it: a temporary file beside it, fsynced, then renamed over ``path``. A command that fails or
    is killed midway leaves ``path`` as it was (and a ``.tmp`` file at most, never a cut one).

    Args:
        path: where the output goes; ``key`` is its argument's name (``output``, ``hyp``), for errors.
        inputs: the command's input files by argument name (a list for several, None for none).

    Raises:
        UserError: ``path`` is one of the inputs (the same path, or the same file by another name: a
            link), which the output would destroy; or its folder cannot be written.
    """
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{key}={path} is a folder; give a file name")
    for name, given in inputs.items():
        for source in given if isinstance(given, (list, tuple)) else [given]:
            if source is not None and target.exists() and Path(source).exists() and os.path.samefile(target, source):
                raise UserError(f"{key}={path} is the input {name}={source}: writing it would destroy what is read; "
                                f"choose another {key}")
    if target.exists() and not target.is_file():  # a device or a pipe (/dev/stdout, /dev/null, a FIFO): no rename
        try:
            stream = open(target, "w", encoding="utf-8")
        except OSError as err:
            raise UserError(f"cannot write {key}={path}: {err.strerror}") from None
        with stream:
            yield stream
        return
    target = target.resolve() if target.is_symlink() else target  # replace the file a link names, not the link
    with durable.replacing(target) as tmp:
        try:
            handle = open(tmp, "w", encoding="utf-8")
        except OSError as err:
            raise UserError(f"cannot write {key}={path}: {err.strerror}") from None
        with handle:
            yield handle


_END = object()


def available_chunks(lines: Iterator[str], max_lines: int, wait: float = 0.05) -> Iterator[list[str]]:
    """Chunks of the lines that have arrived, up to ``max_lines`` each.

    A reader thread pulls ``lines`` ahead; a chunk waits only for its first line and then takes
    what follows within ``wait`` seconds. A file or a fast pipe gives full chunks (large batches); a
    slow pipe or a person typing gets each line translated as soon as it arrives.
    """
    q: queue.Queue = queue.Queue(maxsize=4 * max_lines)

    def read() -> None:
        try:
            for line in lines:
                q.put(line)
        except BaseException as err:  # re-raised in the consuming thread
            q.put(err)
        q.put(_END)

    threading.Thread(target=read, daemon=True).start()
    pending = q.get()
    while pending is not _END:
        chunk: list[str] = []
        while isinstance(pending, str) and len(chunk) < max_lines:
            chunk.append(pending)
            try:
                pending = q.get(timeout=wait)
            except queue.Empty:
                pending = None
        if chunk:  # what arrived before an error is still translated
            yield chunk
        if isinstance(pending, BaseException):
            raise pending
        if pending is None:
            pending = q.get()

