"""The one place the command-line tools print to a person.

Results go to stdout (``result``, ``stream``), notes and progress to stderr
(``note``), and a refusal is one line on stderr saying what to do (``fail``,
via ``UsageError``), never a traceback. Library diagnostics are ``logging``
records; ``setup_logging`` shows them on stderr.
"""

import logging
import sys
import warnings
from typing import Optional


class UsageError(Exception):
    """Wrong input: the message says what was wrong and what to do instead. Exit status 2."""

    status = 2


class Failure(Exception):
    """The command could not do its work (a node refused, a file was bad). Exit status 1."""

    status = 1


def result(text: str = "") -> None:
    """A command's result, on stdout."""
    print(text, flush=True)


def stream(piece: str) -> None:
    """A piece of generated text, on stdout, as it comes."""
    print(piece, end="", flush=True)


def note(text: str) -> None:
    """Progress or a summary for the person watching, on stderr."""
    print(text, file=sys.stderr, flush=True)


def fail(prog: str, e: BaseException) -> int:
    """One line on stderr naming the tool and what to do; the exit status for ``e``."""
    text = " ".join(str(e).split()) or type(e).__name__
    print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
    return getattr(e, "status", 1)


class _Stderr(logging.Handler):
    def emit(self, record):
        level = "" if record.levelno < logging.WARNING else record.levelname.lower() + ": "
        note(f"{level}{record.getMessage()}")


def setup_logging(verbose: bool = False, level: Optional[int] = None) -> None:
    """Show the library's diagnostics (warnings; with ``verbose``, info) on stderr, once."""
    root = logging.getLogger("turbocluster")
    if not any(isinstance(h, _Stderr) for h in root.handlers):
        root.addHandler(_Stderr())
    # the library also raises its warnings as Python warnings (for code to catch); a person sees the log line once
    warnings.filterwarnings("ignore", module=r"turbocluster\.")
    root.setLevel(level if level is not None else (logging.INFO if verbose else logging.WARNING))


class LoadProgress:
    """Per-node load progress: one tqdm bar per node on a terminal, plain lines (each stage, every 25%) otherwise.

    ``update(address, p)`` takes a ``pb.LoadProgress``; it may be called from several threads (nodes load at once).
    """

    def __init__(self, addresses: list, stream=None):
        import threading

        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.lock = threading.Lock()
        self.last = {}  # address -> (stage, quarter) last printed
        self.bars = {}
        if self.tty:
            from tqdm import tqdm

            width = max((len(a) for a in addresses), default=0)
            for i, a in enumerate(addresses):
                self.bars[a] = tqdm(total=100, desc=a.ljust(width), position=i, file=self.stream, leave=True,
                                    bar_format="{desc} {bar} {percentage:3.0f}% {postfix}")

    def update(self, address: str, p) -> None:
        with self.lock:
            bar = self.bars.get(address)
            if bar is not None:
                bar.n = round(100 * p.fraction)
                bar.set_postfix_str(f"{p.stage}: {p.message}"[:60], refresh=True)
                return
            key = (p.stage, int(4 * p.fraction) if p.stage == "load" else -1)
            if self.last.get(address) != key or p.done:
                self.last[address] = key
                print(f"  {address}: {p.stage} {p.fraction:.0%} {p.message}", file=self.stream, flush=True)

    def close(self) -> None:
        with self.lock:
            for bar in self.bars.values():
                bar.close()
            self.bars.clear()
