"""How artifactfs starts Python subprocesses: never with the working directory importable.

``python -m pkg.mod`` puts the current directory first on ``sys.path``; our packages have
generic names (``client``, ``server``), so a ``client.py`` in whatever folder a user (or root,
from ``/tmp``) runs ``artifactfs mount`` in would be imported by the daemon.  ``-P`` (Python
3.11+) leaves that entry out and keeps PYTHONPATH; on 3.10 ``-I`` (isolated mode) does it,
which also ignores PYTHON* variables and the user site.  PYTHONSAFEPATH=1 in the child's
environment carries the rule to the processes it starts in turn (multiprocessing workers).
"""

from __future__ import annotations

import os
import sys


def python_argv(*args: str) -> list[str]:
    """``[python, -P|-I, *args]``: a command line for this interpreter that cannot import the cwd."""
    return [sys.executable, "-P" if sys.version_info >= (3, 11) else "-I", *args]


def safe_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default: os.environ) that keeps the rule for grandchildren."""
    return {**(os.environ if env is None else env), "PYTHONSAFEPATH": "1"}
