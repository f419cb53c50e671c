"""The run's log: the quick-start guide's ``[INFO]`` lines and blocks, on stdout and in training.log."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


class RunLog:
    """``info("x")`` prints ``[INFO] x``; ``block(text)`` prints text as is. Both go to stdout (unless ``echo`` is
    False: search trials, data-parallel ranks other than 0) and the log file. Warnings of the ``captured`` loggers
    (the data sets': an image replaced under ``on_bad_sample: skip``) go there too, as ``[WARNING] ...``."""

    def __init__(self, log_file: str | Path | None = None, name: str = "vtp", echo: bool = True,
                 captured: tuple[str, ...] = ("data",)):
        self.logger = logging.getLogger(f"{name}.{id(self)}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self.captured: list[tuple[logging.Logger, logging.Handler]] = []
        if log_file is not None:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        for fmt, loggers in (("%(message)s", [self.logger]), ("[%(levelname)s] %(message)s",
                                                               [logging.getLogger(c) for c in captured])):
            for logger in loggers:
                handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)] if echo else []
                if log_file is not None:
                    handlers.append(logging.FileHandler(log_file, mode="a", encoding="utf-8"))
                for handler in handlers:
                    handler.setFormatter(logging.Formatter(fmt))
                    logger.addHandler(handler)
                    if logger is not self.logger:
                        handler.setLevel(logging.WARNING)
                        self.captured.append((logger, handler))

    def info(self, message: str) -> None:
        self.logger.info(f"[INFO] {message}")

    def warning(self, message: str) -> None:
        self.logger.info(f"[WARNING] {message}")

    def block(self, text: str) -> None:
        self.logger.info(text)

    def close(self) -> None:
        for handler in list(self.logger.handlers):
            handler.close()
            self.logger.removeHandler(handler)
        for logger, handler in self.captured:
            handler.close()
            logger.removeHandler(handler)
        self.captured = []
