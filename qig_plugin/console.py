"""A quiet console for ``qig quantize``: llm-compressor's log lines go to a log file, its progress bars stay.

llm-compressor logs through loguru to stdout: per-module INFO lines (``Quantizing 1 module(s): [...]``) and METRIC
lines (``GPTQ | METRIC - error 1.00``) around its progress bars; transformers, datasets and others warn through
Python's ``logging`` and ``warnings``. Inside :func:`captured_logs` all of these are written to one log
(llm-compressor's line format) and, unless ``verbose``, kept off the console: only errors are printed there. The
progress bars (tqdm, written to stderr directly) are untouched. On exit the previous logging set-up is restored.
``qig quantize`` saves the log in the checkpoint folder.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

# llm-compressor's own console format (llmcompressor/logger.py)
LOG_FORMAT = "{time:YYYY-MM-DDTHH:mm:ss.SSSS} | {function} | {level} - {message}"


class LogFile:
    """The log of one run, with counts of the warnings and errors written to it.

    Written as it grows to a file in the temporary folder (``path``; in memory when no file can be created there),
    deleted on close unless ``keep``.
    """

    def __init__(self, prefix: str, verbose: bool):
        self.verbose = verbose
        self.warnings = 0
        self.errors = 0
        self.lines = 0
        self.work_started = False  # set by the caller once the real work (model load, calibration) begins
        self.keep = False  # set by the caller to keep the file (e.g. after a failure)
        self.path: Path | None = Path(tempfile.gettempdir()) / f"{prefix}-{os.getpid()}-{time.time_ns()}.log"
        try:
            self._file = self.path.open("x", encoding="utf-8")
        except OSError:
            self.path, self._file = None, io.StringIO()

    def write(self, text: str, level: int = logging.INFO) -> None:
        """Append ``text`` (one or more lines) logged at ``level`` (a ``logging`` level number)."""
        if not text.strip():
            return
        self._file.write(text if text.endswith("\n") else text + "\n")
        self._file.flush()
        self.lines += text.count("\n") + (0 if text.endswith("\n") else 1)
        self.warnings += logging.WARNING <= level < logging.ERROR
        self.errors += level >= logging.ERROR

    def text(self) -> str:
        """Everything logged so far."""
        return self.path.read_text(encoding="utf-8") if self.path is not None else self._file.getvalue()

    def close(self) -> None:
        """Close the log; delete its file unless ``keep``."""
        self._file.close()
        if self.path is not None and not self.keep:
            self.path.unlink(missing_ok=True)

    def imports(self) -> contextlib.AbstractContextManager:
        """A context for code that may import llm-compressor (set by :func:`captured_logs`)."""
        raise NotImplementedError

    def describe(self) -> str:
        """E.g. ``"412 lines, 3 warnings"``."""
        counts = [f"{self.lines} lines"]
        counts += [f"{count} {name}{'s' if count != 1 else ''}" for count, name in
                   ((self.warnings, "warning"), (self.errors, "error")) if count]
        return ", ".join(counts)


class _ImportStream(io.TextIOBase):
    """Stdout while llm-compressor may be imported: its console handler, set up at import, binds the current
    ``sys.stdout``, so its import-time lines come here, into the log."""

    def __init__(self, log: LogFile):
        self.log = log

    def write(self, text: str) -> int:
        level = logging.WARNING if " | WARNING - " in text else logging.INFO
        self.log.write(text, level)
        return len(text)


@contextlib.contextmanager
def captured_logs(prefix: str, *, verbose: bool = False) -> Iterator[LogFile]:
    """Send llm-compressor's loguru lines, Python warnings and library ``logging`` records to a :class:`LogFile`
    (``<temporary folder>/<prefix>-<pid>-<ns>.log``, deleted on exit unless its ``keep`` is set).

    Without ``verbose`` the console keeps only errors (and every progress bar); with it, the log lines are printed
    as usual too. Importing llm-compressor configures loguru afresh (its console handler on stdout): run the code
    that may import it first inside ``log.imports()`` (see :meth:`LogFile.imports`), which puts the import-time
    lines in the log too and re-applies this set-up. Restores loguru's (llm-compressor's, once imported) console
    logging, ``logging``'s console output and ``warnings``' display on exit.
    """
    from loguru import logger

    log = LogFile(prefix, verbose)

    def loguru_sink(message) -> None:
        level = message.record["level"]
        log.write(str(message), logging.INFO if level.name == "METRIC" else level.no)  # METRIC (38) is no warning

    def apply_loguru() -> None:
        logger.remove()
        logger.add(loguru_sink, level="INFO", format=LOG_FORMAT)
        logger.add(sys.stdout if verbose else sys.stderr, level="INFO" if verbose else "ERROR", format=LOG_FORMAT)

    @contextlib.contextmanager
    def imports() -> Iterator[None]:
        redirect = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(_ImportStream(log))
        try:
            with redirect:
                yield
        finally:
            apply_loguru()

    log.imports = imports
    apply_loguru()

    # every logging handler that writes to the console, also those created later (auto-round's, at its import)
    console_emit = logging.StreamHandler.emit
    formatter = logging.Formatter("%(asctime)s | %(name)s | %(levelname)s - %(message)s")

    def emit(handler: logging.StreamHandler, record: logging.LogRecord) -> None:
        if isinstance(handler, logging.FileHandler):
            return console_emit(handler, record)
        try:
            log.write(formatter.format(record), record.levelno)
        except Exception:  # noqa: BLE001 - logging must never fail the run
            pass
        if verbose or record.levelno >= logging.ERROR:
            console_emit(handler, record)

    logging.StreamHandler.emit = emit
    try:
        with warnings.catch_warnings():
            previous_showwarning = warnings.showwarning

            def showwarning(message, category, filename, lineno, file=None, line=None):
                text = warnings.formatwarning(message, category, filename, lineno, line)
                log.write(text.rstrip("\n"), logging.WARNING)
                if verbose:
                    previous_showwarning(message, category, filename, lineno, file, line)

            warnings.showwarning = showwarning
            yield log
    finally:
        logging.StreamHandler.emit = console_emit
        logger.remove()
        # the process's own streams: a replaced sys.stdout (a test's capture) may be closed after this returns
        with contextlib.redirect_stdout(sys.__stdout__):
            if "llmcompressor.logger" in sys.modules:
                llmcompressor_logging = importlib.import_module("llmcompressor.logger")  # (the package's is loguru's)
                llmcompressor_logging.configure_logger(llmcompressor_logging.LOGGER_CONFIG)
            else:
                logger.add(sys.__stderr__)  # loguru's own default
        log.close()
