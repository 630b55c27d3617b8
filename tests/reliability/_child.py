"""A latentrt process that stops itself (SIGSTOP) right after a given log line, for the tests to
signal it at exactly that point of its work.

    python _child.py PATTERN cli ARGS...              run `latentrt ARGS`
    python _child.py PATTERN copy SRC OUT [--two-renames]
                                                      write OUT as a copy of the bundle SRC through
                                                      `writing_bundle(OUT, overwrite=True)`; with
                                                      --two-renames the swap takes the fallback path
                                                      (as on a file system without RENAME_EXCHANGE)

The first log record of a `latentrt` logger whose message matches the regular expression PATTERN
writes "STOPPED AT: <message>" to stderr and stops the process; the parent then sends SIGKILL or
SIGTERM (+ SIGCONT).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import sys


class StopAt(logging.Handler):
    def __init__(self, pattern: str) -> None:
        super().__init__(logging.DEBUG)
        self.pattern = re.compile(pattern)
        self.done = False

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if not self.done and self.pattern.search(message):
            self.done = True
            sys.stderr.write(f"STOPPED AT: {message}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGSTOP)


def main() -> int:
    pattern, mode, *args = sys.argv[1:]
    logger = logging.getLogger("latentrt")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(StopAt(pattern))
    if mode == "cli":
        from latentrt.cli.main import main as cli

        return cli(args)
    from latentrt.bundle import writer

    src, out = args[0], args[1]
    if "--two-renames" in args:
        writer._exchange = lambda a, b: False
    with writer.writing_bundle(out, overwrite=True) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
