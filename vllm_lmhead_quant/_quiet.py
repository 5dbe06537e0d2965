"""Our CLIs' results on the terminal, vLLM's start-up noise in a log file.

vLLM's engines print ~100 lines per run (kernel registrations, thread binding, LD_PRELOAD and NUMA notes, progress
bars), some from C++ straight to file descriptor 2, so a logging handler alone cannot hold them back. ``vllm_log``
points descriptors 1 and 2 at a log file while the engines run (worker processes inherit them) and gives the tool a
``say`` that still reaches the terminal. Our own warnings stay visible: ``say`` and the end of the block copy every
new WARNING/ERROR line of ours from the log (any process) to the terminal. Read back from the log rather than caught
by a handler, because vLLM re-applies its logging config when an engine starts, which drops the handlers of its
children, our logger's included. vLLM itself is not patched: only file descriptors move.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

# A line of ours at WARNING or above, in vLLM's default format or its JSON one.
_OURS = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b.*\[vllm_lmhead_quant\] (.*)")


def default_log(tool: str) -> Path:
    """``<tmp>/vllm_lmhead_quant-<tool>.log``: outside the checkout, the same path every run (overwritten). Not a
    directory named like the package: run from <tmp>, Python would import that as a namespace package instead."""
    return Path(tempfile.gettempdir()) / f"vllm_lmhead_quant-{tool}.log"


class Terminal:
    """Where the tool writes while vLLM's output goes to ``log``."""

    def __init__(self, stream, log: Path | None):
        self.stream = stream
        self.log = log
        self._read = 0  # bytes of the log already scanned for our warnings
        self._seen: set[str] = set()

    def say(self, msg: str) -> None:
        """``msg`` on the terminal (stderr), then our warnings logged since the last call."""
        print(msg, file=self.stream, flush=True)
        self.warnings()

    def warnings(self) -> None:
        if self.log is None:
            return  # vLLM's output, ours included, is on the terminal already
        with contextlib.suppress(OSError), open(self.log, "rb") as f:
            f.seek(self._read)
            chunk = f.read()
            end = chunk.rfind(b"\n") + 1  # whole lines only; the rest is read next time
            self._read += end
            for line in chunk[:end].decode(errors="replace").splitlines():
                m = _OURS.search(line)
                if m and m[2] not in self._seen:
                    self._seen.add(m[2])
                    print(f"  {m[1].lower()} (vllm_lmhead_quant): {m[2].strip()}", file=self.stream, flush=True)


@contextlib.contextmanager
def vllm_log(path: str | Path | None) -> Iterator[Terminal]:
    """Inside: descriptors 1 and 2 write to ``path`` (parents created, truncated). ``path=None``: nothing moves
    (vLLM's output on the terminal, for debugging). On an exception the log's last lines go to the terminal."""
    if path is None:
        yield Terminal(sys.stderr, None)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    term = Terminal(os.fdopen(os.dup(saved[2]), "w", buffering=1), path)
    with open(path, "w") as log:
        for fd in (1, 2):
            os.dup2(log.fileno(), fd)
    try:
        yield term
    except BaseException:
        _restore(saved)
        lines = path.read_text(errors="replace").splitlines(keepends=True)[-30:]
        term.say(f"--- the last lines of vLLM's log, {path} ---\n{''.join(lines)}---")
        raise
    finally:
        _restore(saved)
        term.warnings()
        term.stream.close()


def _restore(saved: dict) -> None:
    """Descriptors 1 and 2 back to what they were (once)."""
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, dup in list(saved.items()):
        os.dup2(dup, fd)
        os.close(dup)
        del saved[fd]
