"""Terminal progress for long cirrus commands (on stderr, so stdout stays for results)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """``bar(done, total)`` redraws a bar in place on a terminal; elsewhere (a log, a pipe) it prints
    a line at the start, every tenth and the end. ``total=None``: a counter without a bar."""

    def __init__(self, label: str, unit: str, stream: TextIO | None = None, width: int = 30) -> None:
        self.label, self.unit, self.width = label, unit, width
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.began = time.monotonic()
        self._last_tenth = -1
        self._drawn = False

    def __call__(self, done: int, total: int | None = None) -> None:
        secs = time.monotonic() - self.began
        if total:
            frac = min(1.0, done / total)
            fill = int(frac * self.width)
            text = (f"{self.label} [{'#' * fill}{'.' * (self.width - fill)}] {done}/{total} {self.unit} "
                    f"{frac:4.0%} {secs:5.1f} s")
            tenth = int(frac * 10)
        else:
            text = f"{self.label}: {done} {self.unit} {secs:5.1f} s"
            tenth = done // 10
        if self.tty:
            self.stream.write("\r" + text)
            self._drawn = True
        elif tenth != self._last_tenth:
            self.stream.write(text + "\n")
        self._last_tenth = tenth
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
