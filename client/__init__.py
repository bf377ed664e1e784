"""artifactfs SDK: the W&B Artifacts surface (``Artifact``, ``init``/``Run``, ``Api``) over a
local embedded store or a registry server.

    import client as wandb            # drop-in for the artifact parts of wandb
    with wandb.init(project="mnist") as run:
        art = wandb.Artifact("mnist", type="dataset")
        art.add_dir("data/")
        run.log_artifact(art, aliases=["best"])
"""

from __future__ import annotations

from . import errors
from .api import Api
from .artifact import Artifact, ArtifactManifestEntry, ArtifactTTL
from .errors import (ArtifactFinalizedError, ArtifactFSError, ArtifactNotLoggedError, DigestMismatchError,
                     NotFoundError)
from .live_run import LiveRun, current_run, finish, init, log_artifact, login, save, use_artifact
from .objects import Classes, Table

#: W&B's name for the live run class (``wandb.Run``); the public API's is ``client.api.PublicRun``
Run = LiveRun

from typing import Any as _Any

__all__ = [
    "Api", "Artifact", "ArtifactFSError", "ArtifactTTL", "ArtifactFinalizedError", "ArtifactManifestEntry",
    "ArtifactNotLoggedError", "Classes", "DigestMismatchError", "LiveRun", "NotFoundError", "Run", "Table", "current_run",
    "errors", "finish", "init", "log_artifact", "login", "save", "use_artifact",
]


def __getattr__(name: str) -> _Any:
    """``client.run`` is the current run (None before ``init``) and ``client.config`` its config,
    as ``wandb.run`` / ``wandb.config``: looked up on each access, so they follow init/finish."""
    from . import live_run

    if name == "run":
        return live_run.current_run()
    if name == "config":
        return live_run.config()
    raise AttributeError(f"module 'client' has no attribute {name!r}")
