"""The run's console: what a user acts on; the rest in a log file.

By default a run's console holds the lines coom_nemo prints (the plan's
summary line, the key settings, one line per step, validation and
checkpoint lines, the end-of-run summary), errors, and nothing from the
frameworks underneath. Their output (Python logging, ``warnings``,
Lightning's and megatron-core's prints) goes to the run's log file,
``<run dir>/coom_log_rank<r>.txt``, with the console lines in between;
what is printed before the run folder exists (imports, the recipe
build) is held in memory and written there first.

The rule that tells the two apart is where the text comes from: a
write whose caller is a module of this package (``print`` in
``coom_nemo``, ``bench``, a ``__main__`` script; and argparse's help
and usage) is a console line, any other write is framework output.
``--verbose`` on ``recipes/*.py``, or ``COOM_VERBOSE=1`` (e.g. for
``nemo llm``), shows everything as well. Ranks other than 0 print only
errors, prefixed with their rank.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import sys
import threading
import traceback
from pathlib import Path

VERBOSE_ENV = "COOM_VERBOSE"
LOG_ENV = "COOM_LOG_FILE"  # the log file, for helper processes
LOG_NAME = "coom_log_rank{rank}.txt"
OWN_MODULES = ("coom_nemo", "bench", "__main__", "argparse")  # argparse: --help, usage
WRITE_WRAPPERS = ("wandb",)
_MAX_BUFFERED = 20000  # writes held before the log file exists


def verbose_from_env() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false", "False")


def _rank_from_env() -> int:
    for name in ("RANK", "LOCAL_RANK"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 0


class _Console:
    """Process-wide state: the real streams and where the log goes."""

    def __init__(self):
        self.active = False
        self.verbose: bool | None = None  # None: not decided yet
        self.rank = _rank_from_env()
        self.real = {}  # "out"/"err" -> the streams found at start
        self.held: list[tuple[str, str]] = []  # log text before the file
        self.hidden: list[tuple[str, str]] = []  # framework text not shown
        self.file = None
        self.path: Path | None = None
        self.lock = threading.RLock()
        self.handlers: list[tuple[logging.StreamHandler, object]] = []
        self.last_plan_line: str | None = None
        self.last_resort = None

    # -- writing -------------------------------------------------------

    def log(self, text: str) -> None:
        with self.lock:
            if self.file is not None:
                self.file.write(text)
                self.file.flush()
            elif len(self.held) < _MAX_BUFFERED:
                self.held.append(("", text))

    def stream(self, stream: str):
        """The real stream: as found at start, or the current one."""
        if self.active:
            return self.real[stream]
        current = sys.stdout if stream == "out" else sys.stderr
        if isinstance(current, _Sink):
            current = sys.__stdout__ if stream == "out" else sys.__stderr__
        return current

    def show(self, stream: str, text: str) -> None:
        real = self.stream(stream)
        real.write(text)
        real.flush()

    def write(self, stream: str, text: str, ours: bool) -> None:
        """One write to sys.stdout or sys.stderr while active."""
        self.log(text)
        if self.verbose or (ours and (self.rank == 0 or text.startswith("error"))):
            self.show(stream, text)
        elif self.verbose is None and not ours:
            with self.lock:
                self.hidden.append((stream, text))


_state = _Console()


class _Sink(io.TextIOBase):
    """Stands in for sys.stdout or sys.stderr while a run is quiet."""

    def __init__(self, stream: str):
        self.stream = stream

    def write(self, text: str) -> int:
        if not _state.active:
            _state.show(self.stream, text)
            return len(text)
        # f_back: None when C code writes with no Python caller (the
        # interpreter printing an uncaught exception's traceback)
        _state.write(self.stream, text, _caller(sys._getframe().f_back) in OWN_MODULES)
        return len(text)

    def flush(self) -> None:
        _state.stream(self.stream).flush()

    def isatty(self) -> bool:
        return _state.stream(self.stream).isatty()

    def fileno(self) -> int:
        return _state.stream(self.stream).fileno()

    @property
    def buffer(self):
        return _state.stream(self.stream).buffer

    @property
    def encoding(self):
        return getattr(_state.stream(self.stream), "encoding", "utf-8")


def _caller(frame) -> str:
    """Top-level package of the code that wrote, past wrappers of
    ``write`` (wandb's console capture wraps it when imported)."""
    while frame is not None:
        name = frame.f_globals.get("__name__", "").split(".")[0]
        if name not in WRITE_WRAPPERS:
            return name
        frame = frame.f_back
    return ""


_SINKS = {"out": _Sink("out"), "err": _Sink("err")}


class _LastResort(logging.Handler):
    """Python's handler of last resort (records no handler takes:
    megatron-core's, coom_nemo's own) while a run is quiet: the record
    goes to the log; an error also to the console, naming the rank."""

    def __init__(self):
        super().__init__(logging.WARNING)

    def emit(self, record):
        text = self.format(record)
        _state.write("err", text + "\n", ours=False)
        if record.levelno >= logging.ERROR and not _state.verbose:
            _state.show("err", f"error [rank {_state.rank}]: {text}\n")


# -- lifecycle ---------------------------------------------------------


def start(verbose: bool | None = None, *, main: bool = True) -> bool:
    """Route framework output to the log from now on; True if this call
    started it (False: already active). ``verbose`` None holds the
    framework output until :func:`configure` decides (a script does not
    know ``--verbose`` before its imports are done). ``main`` False is
    a helper process that re-imports a script (multiprocessing's spawn:
    megatron-core's checkpoint writer, filesystem_async.py:54): it
    writes to its parent's log, quiet or verbose as its parent is."""
    if _state.active:
        return False
    if not main:
        verbose = verbose_from_env()
    elif verbose is None and verbose_from_env():
        verbose = True
    _state.active, _state.verbose = True, verbose
    _state.real = {"out": sys.stdout, "err": sys.stderr}
    sys.stdout, sys.stderr = _SINKS["out"], _SINKS["err"]
    _retarget_handlers()
    _state.last_resort, logging.lastResort = logging.lastResort, _LastResort()
    if not main and os.environ.get(LOG_ENV):
        _open_log(Path(os.environ[LOG_ENV]))
    return True


def _retarget_handlers() -> None:
    """Stream handlers made before :func:`start` (NeMo's, Lightning's)
    hold the real streams; point them at the sinks."""
    reals = {id(sys.__stdout__): "out", id(sys.__stderr__): "err"}
    reals.update({id(stream): key for key, stream in _state.real.items()})
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if (isinstance(handler, logging.StreamHandler)
                    and not isinstance(handler, logging.FileHandler)
                    and id(handler.stream) in reals):
                _state.handlers.append((handler, handler.stream))
                handler.setStream(_SINKS[reals[id(handler.stream)]])


def configure(verbose: bool) -> None:
    """Decide what a held start shows: with ``verbose``, the framework
    output so far is shown now and from here on (children started
    later inherit ``COOM_VERBOSE``)."""
    if not _state.active:
        return
    verbose = verbose or verbose_from_env()
    with _state.lock:
        hidden, _state.hidden = _state.hidden, []
        _state.verbose = verbose
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        for stream, text in hidden:
            _state.show(stream, text)


def stop() -> None:
    """Give the real streams and handlers back; close the log file."""
    if not _state.active:
        return
    if _state.verbose is None:  # never decided (e.g. --help): show it all
        configure(True)
    sys.stdout, sys.stderr = _state.real["out"], _state.real["err"]
    for handler, stream in _state.handlers:
        if handler.stream in _SINKS.values():
            handler.setStream(stream)
    _state.handlers.clear()
    logging.lastResort = _state.last_resort
    with _state.lock:
        if _state.file is not None:
            _state.file.close()
        _state.file, _state.path = None, None
        os.environ.pop(LOG_ENV, None)
        _state.held.clear()
        _state.active = False
    _state.verbose, _state.rank = None, _rank_from_env()


atexit.register(stop)


@contextlib.contextmanager
def session():
    """A run: quiet unless ``COOM_VERBOSE``, or as a script started it.
    An exception leaves one line on the console naming the rank, its
    traceback in the log (on the console too when there is no log); a
    :class:`~coom_nemo.plan.PlanError` only its line, once."""
    started = start(verbose_from_env() if not _state.active else None)
    try:
        yield
    except BaseException as exc:
        if _state.active and not isinstance(exc, (SystemExit, KeyboardInterrupt)):
            report(exc)
        raise
    finally:
        if started:
            stop()


def is_rank_zero() -> bool:
    """This process is the job's first (torchrun's ``RANK`` and
    ``LOCAL_RANK``; a process without them is)."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def report(exc: BaseException) -> None:
    from coom_nemo.plan import PlanError

    if isinstance(exc, PlanError):  # a refusal before the run: its line says it all
        _state.log(f"error: {exc}\n")
        if is_rank_zero():
            _state.show("err", f"error: {exc}\n")
        return
    text = "".join(traceback.format_exception(exc))
    _state.log(text)
    if _state.verbose:
        return  # the traceback reaches the console as it propagates
    where = f" (traceback in {_state.path})" if _state.path else ""
    error(f"{type(exc).__name__}: {exc}{where}", rank=_state.rank)
    if _state.path is None:
        _state.show("err", text)


def attach(run_dir, rank: int) -> Path | None:
    """Start the log file of this rank in ``run_dir``, writing what was
    held so far first."""
    _state.rank = rank
    if not _state.active:
        return None
    path = Path(run_dir) / LOG_NAME.format(rank=rank)
    if _state.path != path:
        path.parent.mkdir(parents=True, exist_ok=True)
        _open_log(path)
        os.environ[LOG_ENV] = str(path)  # for helper processes started from here
    return path


def _open_log(path: Path) -> None:
    with _state.lock:
        if _state.file is not None:
            _state.file.close()
        _state.file = open(path, "a", encoding="utf-8")
        _state.path = path
        for _, text in _state.held:
            _state.file.write(text)
        _state.held.clear()
        _state.file.flush()


def log_path() -> Path | None:
    return _state.path


def rank() -> int:
    return _state.rank


# -- console lines -----------------------------------------------------


def info(line: str) -> None:
    """A console line (rank 0 only; every rank's log has it)."""
    if not _state.active:
        if _state.rank == 0:
            print(line, flush=True)
        return
    _state.write("out", line + "\n", ours=True)


def warn(line: str) -> None:
    """A warning that asks the user to act."""
    info(f"warning: {line}")


def error(line: str, rank: int | None = None) -> None:
    """An error line on every rank; ``rank`` names it in multi-rank
    runs."""
    prefix = "error" if rank is None else f"error [rank {rank}]"
    text = f"{prefix}: {line}\n"
    if _state.active:
        _state.log(text)
        _state.show("err", text)
    else:
        sys.stderr.write(text)
        sys.stderr.flush()


def plan_line(line: str, repeat: bool = True) -> None:
    """The plan's summary line; with ``repeat`` False, not when it is
    the line printed last (a factory prints it, then ``api.pretrain``
    checks the same plan again in the same process)."""
    if repeat or line != _state.last_plan_line:
        info(line)
    _state.last_plan_line = line
