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
from .run import Run, current_run, init, log_artifact, use_artifact

__all__ = [
    "Api", "Artifact", "ArtifactFSError", "ArtifactTTL", "ArtifactFinalizedError", "ArtifactManifestEntry",
    "ArtifactNotLoggedError", "DigestMismatchError", "NotFoundError", "Run", "current_run", "errors", "init",
    "log_artifact", "use_artifact",
]
