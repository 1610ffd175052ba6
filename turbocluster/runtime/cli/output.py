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
