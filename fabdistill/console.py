"""What the apps print: a quiet console with one progress bar per training phase, and everything in log files.

Quiet by default: Ray's INFO logs, its worker prefixes and Ray Data's progress bars stay off the console, which
shows milestones (data ready, checkpoint saved, resumed from step N, tables) and a progress bar. `--verbose` on
the apps (or FABDISTILL_VERBOSE=1 in the environment; the flag sets it before Ray starts, so Ray's processes see
it too) brings Ray's output back. Either way every line, Ray's workers' included, goes to the log files opened
with :func:`log_to` (`<run_dir>/console.log` during a training phase).

On a terminal the bar is a tqdm bar; elsewhere (a pipe, `ray job logs`) it is one plain line per tenth of the
phase, with no carriage returns. TQDM_DISABLE=1 turns both off (the tests set it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any, TextIO

VERBOSE_ENV = "FABDISTILL_VERBOSE"
_TRUE = ("1", "true", "yes", "on")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def verbose() -> bool:
    """True when Ray's own output should reach the console (FABDISTILL_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in _TRUE


def set_verbose(on: bool = True) -> None:
    """What `--verbose` does: set FABDISTILL_VERBOSE for this process and the Ray processes it starts later."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


def progress_disabled() -> bool:
    """TQDM_DISABLE=1 (as the tests set): no bars and no progress lines."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in _TRUE


# --------------------------------------------------------------------------- log files

_lock = threading.RLock()  # sinks, tees and bars are shared by the main thread, monitors and Ray's log thread


class _Sink:
    """One open log file (`uri` local, or s3:// written to a local file and uploaded when closed)."""

    def __init__(self, uri: str):
        from fabdistill import storage

        self.uri, self.refs = uri, 1
        self.s3 = storage.is_s3(uri)
        if self.s3:
            fd, self.path = tempfile.mkstemp(prefix="console-", suffix=".log")
            os.close(fd)
        else:
            self.path = uri
            os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (open while the block runs)

    def write(self, text: str) -> None:
        self.file.write(text)
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        if self.s3:
            from fabdistill import storage

            with open(self.path, "rb") as f:
                new = f.read()
            old = storage.read_bytes(self.uri) if storage.exists(self.uri) else b""
            storage.write_bytes(self.uri, old + new)  # S3 objects cannot be appended to
            os.unlink(self.path)


_sinks: list[_Sink] = []


def _to_sinks(lines: str) -> None:
    """Complete lines (each ending in a newline) to every open log file, without colour codes."""
    if not lines:
        return
    clean = _ANSI.sub("", lines)
    with _lock:
        for sink in _sinks:
            sink.write(clean)


class _Tee:
    """sys.stdout / sys.stderr while a log file is open: writes go to the stream and, line by line, to the logs.

    A line redrawn with carriage returns (a bar) reaches the logs once, as it last looked."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self._pending = ""

    def write(self, text: str) -> int:
        n = self.stream.write(text)
        with _lock:
            self._pending += text
            if "\n" in self._pending:
                done, self._pending = self._pending.rsplit("\n", 1)
                _to_sinks("".join(line.rsplit("\r", 1)[-1] + "\n" for line in done.split("\n")))
        return n if n is not None else len(text)

    def drain(self) -> None:
        with _lock:
            if self._pending.strip():
                _to_sinks(self._pending.rsplit("\r", 1)[-1] + "\n")
            self._pending = ""

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, buffer ... of the real stream
        return getattr(self.stream, name)


def _install_tees() -> None:
    for name in ("stdout", "stderr"):
        if not isinstance(getattr(sys, name), _Tee):
            setattr(sys, name, _Tee(getattr(sys, name)))


def _remove_tees() -> None:
    for name in ("stdout", "stderr"):
        current = getattr(sys, name)
        if isinstance(current, _Tee):  # someone else's replacement since (pytest capture...) stays
            current.drain()
            setattr(sys, name, current.stream)


@contextlib.contextmanager
def log_to(uri: str) -> Iterator[None]:
    """Append everything printed in this process (and, when quiet, Ray's workers' output) to `uri`, local or
    s3://, until the block ends. Nested blocks write to every open file; the same file is opened once."""
    with _lock:
        sink = next((s for s in _sinks if s.uri == uri), None)
        if sink is not None:
            sink.refs += 1
        else:
            sink = _Sink(uri)
            _sinks.append(sink)
        _install_tees()
    try:
        yield
    finally:
        with _lock:
            sink.refs -= 1
            if sink.refs == 0:
                if len(_sinks) == 1:
                    _remove_tees()
                _sinks.remove(sink)
                sink.close()


def log_only(text: str) -> None:
    """A line for the log files only (what verbose mode would also print)."""
    _to_sinks(text.rstrip("\n") + "\n")


_bars: list[Any] = []  # live tqdm bars, cleared while a line is printed above them


def say(text: str) -> None:
    """Print a milestone line to the console and the logs, above any live progress bar."""
    with _lock:
        for bar in _bars:
            bar.clear()
        print(text, flush=True)
        for bar in _bars:
            bar.refresh()


def _terminal() -> TextIO:
    """The real stderr: bars are drawn there, not through the log tee (their redraws are not log lines)."""
    stream = sys.stderr
    while isinstance(stream, _Tee):
        stream = stream.stream
    return stream


# --------------------------------------------------------------------------- Ray's output

def ray_env_defaults() -> None:
    """Environment read by Ray processes started after this call (and by Ray Train at fit()).

    RAY_TRAIN_ENABLE_PRINT_PATCH=0: Train V2 sends a worker's print() both to the root logger's console handler
    and to the original stdout, so every line arrived twice."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if not verbose():
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        # Ray's start-up notice that token authentication is on: to the log files, not the console
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_to_log_only)


def _to_log_only(record: logging.LogRecord) -> bool:
    """A logging filter that writes the record to the log files and keeps it off the console."""
    log_only(record.getMessage() + "\n")
    return False


def ray_init_kwargs() -> dict:
    """ray.init arguments: worker output still streams to this driver (for the logs); see route_worker_logs."""
    return {"log_to_driver": True, "logging_level": logging.INFO if verbose() else logging.WARNING}


_ROUTE = "fabdistill_console_log"


def route_worker_logs() -> None:
    """When quiet, send the workers' streamed output to the log files instead of the console.

    Ray 2.60 prints worker output through a dispatcher (ray._private.worker.global_worker_stdstream_dispatcher,
    handler "ray_print_logs"); replacing that handler keeps the stream, with its "(Actor pid=...)" prefixes, for
    the logs. When verbose, Ray prints as usual and the tee copies it into the logs."""
    if verbose():
        return
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray: its output stays on the console
        return
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler(_ROUTE)
    dispatcher.add_handler(_ROUTE, _log_worker_output)


def _log_worker_output(data: dict) -> None:
    who = data.get("actor_name") or data.get("task_name") or ""
    prefix = f"({who + ' ' if who else ''}pid={data.get('pid')}) "
    lines = data.get("lines") or []
    if data.get("pid") == "autoscaler":  # its status table every few seconds: keep its events, as Ray does
        from ray._private.worker import filter_autoscaler_events

        lines = list(filter_autoscaler_events(lines))
    if lines:
        _to_sinks("".join(prefix + line.rsplit("\r", 1)[-1] + "\n" for line in lines))


# --------------------------------------------------------------------------- progress

def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class PhaseProgress:
    """Progress of one training phase, fed with its metrics rows (rank 0's reports: step, elapsed_s, loss ...).

    Rates come from the rows' `elapsed_s` (rank 0's clock over the last few reports), so the time Ray spends
    starting workers does not distort them. `total`: the phase's last step (None: unknown, no percentage or
    ETA); `initial`: the step it resumes from; `samples_per_step`: the global batch (None: rates in steps/s).
    On a terminal: a tqdm bar; otherwise (or when verbose, between Ray's lines) one line per `every` of the
    phase, or per report when the total is unknown.
    """

    def __init__(self, name: str, total: int | None, initial: int = 0,
                 samples_per_step: int | None = None, every: float = 0.1, stream: TextIO | None = None):
        self.name, self.total, self.step = name, total, initial
        self.samples_per_step = samples_per_step
        self.enabled = not progress_disabled()
        stream = stream or _terminal()
        self.tty = self.enabled and bool(getattr(stream, "isatty", lambda: False)()) and not verbose()
        self._every = max(1, math.ceil(total * every)) if total else None
        self._next_line = initial + (self._every or 1)
        self._window: list[tuple[int, float]] = []  # (step, elapsed_s) of this attempt's latest reports
        self._bar = None
        if self.tty:
            from tqdm import tqdm

            fmt = ("{desc} {percentage:3.0f}%|{bar:24}| {n}/{total} [{elapsed}{postfix}]" if total else
                   "{desc} step {n} [{elapsed}{postfix}]")
            self._bar = tqdm(total=total, initial=initial, desc=name, file=stream, bar_format=fmt,
                             dynamic_ncols=True, leave=True, disable=False, mininterval=0.5)
            with _lock:
                _bars.append(self._bar)

    def rate(self) -> float | None:
        """Steps per second over the window, or None before two reports."""
        if len(self._window) < 2:
            return None
        (s0, t0), (s1, t1) = self._window[0], self._window[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

    def describe(self, row: dict) -> str:
        """'loss 0.1234 | 512 samples/s | ETA 1:23' for the latest row."""
        parts = []
        loss = row.get("loss")
        if loss is None:
            loss = next((v for k, v in row.items() if k not in ("step", "elapsed_s") and isinstance(v, float)),
                        None)
        if isinstance(loss, (int, float)):
            parts.append(f"loss {loss:.4g}")
        rate = self.rate()
        if rate is not None:
            parts.append(f"{rate * self.samples_per_step:.0f} samples/s" if self.samples_per_step else
                         f"{rate:.2f} steps/s")
            if self.total:
                parts.append(f"ETA {_clock((self.total - self.step) / rate)}")
        return " | ".join(parts)

    def update(self, row: dict) -> None:
        step, elapsed = int(row["step"]), row.get("elapsed_s")
        if isinstance(elapsed, (int, float)):
            if self._window and (elapsed < self._window[-1][1] or step < self._window[-1][0]):
                self._window = []  # a new attempt (restart): its clock starts again
            self._window = (self._window + [(step, float(elapsed))])[-5:]
        self.step = step
        if not self.enabled:
            return
        text = self.describe(row)
        if self._bar is not None:
            with _lock:
                self._bar.n = step
                self._bar.set_postfix_str(text, refresh=True)
            return
        if step >= self._next_line or (self.total and step >= self.total):
            pct = f" {100 * step / self.total:3.0f}%" if self.total else ""
            of = f"/{self.total}" if self.total else ""
            say(f"[{self.name}]{pct} step {step}{of}" + (f" | {text}" if text else ""))
            every = self._every or 1
            self._next_line = (step // every + 1) * every

    def close(self) -> None:
        if self._bar is not None:
            with _lock:
                self._bar.close()
                _bars.remove(self._bar)
            log_only(f"[{self.name}] step {self.step}" + (f"/{self.total}" if self.total else ""))
            self._bar = None
