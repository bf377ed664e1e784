"""``init()`` and the SDK ``Run``: the unit of lineage.

A run logs artifacts (outputs) and uses artifacts (inputs); the store records both, which is
what ``Artifact.logged_by()``/``used_by()`` and ``Run.logged_artifacts()``/``used_artifacts()``
read back.  Like W&B there is one *current* run per process (``init`` sets it, ``finish``
clears it); ``Artifact.save()`` without one creates a short run of job type "auto".
"""

from __future__ import annotations

import atexit
import glob as globlib
import logging
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any, Sequence

from . import names, settings
from .api import PublicRun
from .artifact import Artifact
from .errors import ArtifactFSError, InvalidNameError
from .store import Store
from .transfer import close_stores, get_store

__all__ = ["Config", "LiveRun", "current_run", "finish", "init", "log_artifact", "login", "save", "use_artifact"]

_current: LiveRun | None = None
_current_lock = threading.Lock()
_exit_hook: list[bool] = []
log = logging.getLogger(__name__)


def _finish_at_exit() -> None:
    """As wandb does: the current run is finished when the interpreter exits, "crashed" after an
    uncaught exception (Python leaves it in ``sys.last_value``), so its last summary is stored."""
    run = _current
    if run is None or run._finished:
        return
    try:
        run.finish(exit_code=1 if getattr(sys, "last_value", None) is not None else 0)
    except Exception as exc:  # noqa: BLE001 - the process is exiting; say why the run stays open
        log.warning("could not finish run %s at exit: %s", run.path, exc)


class Config(dict):
    """``wandb.config``: a dict whose keys also read and write as attributes."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def setdefaults(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self.setdefault(k, v)


#: a live run writes its summary/tags/config to the store at most this often (and at finish)
SAVE_INTERVAL = 2.0


class LiveRun(PublicRun):
    """A live run: adds finishing, ``log``/``summary``, ``config`` and the context-manager
    protocol to the public Run.

    ``log`` keeps the last value of each key in ``summary`` (there is no history); the summary,
    the tags and the config are stored with the run on the first change, then at most every
    SAVE_INTERVAL seconds, and at ``finish``, so ``Api().runs(filters=...)`` sees them.
    """

    def __init__(self, store: Store, record: Any, tags: Sequence[str] = ()) -> None:
        self._last_save: float | None = None
        super().__init__(store, record)
        self._finished = False
        self._step = 0
        self._save_at_end: list[tuple[str, str]] = []  #: run.save(policy="live"/"end") files
        if tags:
            self.tags = tags

    def _set_record(self, record: Any) -> None:
        super()._set_record(record)
        self._config = Config(record.config or {})

    def _summary_changed(self) -> None:
        self._changed()

    @property
    def config(self) -> Config:
        return self._config  # type: ignore[return-value]

    @property  # type: ignore[override]
    def tags(self) -> tuple[str, ...]:
        return tuple(self._tags)

    @tags.setter
    def tags(self, value: Sequence[str]) -> None:
        self._tags = names.validate_run_tags(value)
        self._changed()

    def _changed(self) -> None:
        if self._last_save is None or time.monotonic() - self._last_save >= SAVE_INTERVAL:
            self._save()

    def _save(self) -> None:
        self._last_save = time.monotonic()
        self._record = self._store.update_run(self.entity, self.project, self.id, summary=dict(self._summary),
                                              tags=list(self._tags), config=dict(self._config))

    @property
    def url(self) -> str:
        base = self._store.location
        if not base.startswith(("http://", "https://")):
            base = Path(base).as_uri()
        return f"{base.rstrip('/')}/{self.entity}/{self.project}/runs/{self.id}"

    def log(self, data: dict[str, Any], step: int | None = None, commit: bool | None = None) -> None:
        """``run.log(dict)``: the last value of each key becomes the run's summary (stored)."""
        self._check_live()
        if not isinstance(data, dict):
            raise TypeError(f"run.log takes a dict, got {type(data).__name__}")
        names.validate_run_dict("log data", data)  # a value JSON cannot hold fails here, not at finish
        self._summary.update(data)
        self._step = (step if step is not None else self._step) + 1

    def save(self, glob_str: str | os.PathLike[str] | None = None,  # type: ignore[override]
             base_path: str | os.PathLike[str] | None = None, policy: str = "live", glob: bool = True) -> list[str]:
        """``run.save(glob)``: save the matching files with the run, named by their path below
        ``base_path`` (default: the working directory for a relative pattern, the parent of
        the files' directory for an absolute one, as in W&B).  "now" uploads them now, "end"
        at ``finish``, "live" now and again at ``finish`` (the latest content; no watching).
        Returns the names saved now.  Without a pattern it is the public ``Run.save()``."""
        if glob_str is None:
            super().save()
            return []
        self._check_live()
        if policy not in ("live", "end", "now"):
            raise ValueError('Only "live", "end" and "now" policies are currently supported.')
        pattern = os.path.abspath(os.fspath(glob_str))
        if base_path is not None:
            root = os.path.abspath(os.fspath(base_path))
        else:
            root = os.path.abspath(".") if not os.path.isabs(os.fspath(glob_str)) else os.path.dirname(
                os.path.dirname(pattern))
        paths = sorted(globlib.glob(pattern)) if glob else [pattern]
        files = [p for p in paths if os.path.isfile(p)]
        if policy != "now":
            self._save_at_end.extend((p, root) for p in files)
        if policy == "end":
            return []
        return [self.upload_file(p, root=root).name for p in files]

    def link_artifact(self, artifact: Artifact, target_path: str, aliases: Sequence[str] | None = None) -> Artifact:
        """``run.link_artifact``: link a logged version into a portfolio / registry collection."""
        self._check_live()
        return artifact.link(target_path, list(aliases) if aliases else None)

    def log_model(self, path: str | os.PathLike[str], name: str | None = None,
                  aliases: Sequence[str] | None = None) -> Artifact:
        """``run.log_model``: log a file or directory as an artifact of type "model"."""
        return self.log_artifact(path, name=name, type="model", aliases=aliases)

    def use_model(self, name: str) -> str:
        """``run.use_model``: use a "model" artifact and return the path it was downloaded to."""
        art = self.use_artifact(name)
        if art.type != "model":
            raise InvalidNameError(f"artifact {name!r} has type {art.type!r}, not 'model'")
        return art.download()

    # W&B's live run and public Run take different arguments (wandb.Run vs wandb.apis.public.Run)
    def log_artifact(self, artifact_or_path: Artifact | str | os.PathLike[str], name: str | None = None,  # type: ignore[override]
                     type: str | None = None, aliases: Sequence[str] | None = None,
                     tags: Sequence[str] | None = None) -> Artifact:
        """Log an artifact (or a file/directory path, wrapped in a new artifact) as an output.

        A path becomes an artifact named ``name`` (default ``run-<id>-<basename>``) of type
        ``type`` (default "unspecified").  Logging content equal to ``latest`` is a no-op that
        returns that version, with the new aliases and tags added.
        """
        self._check_live()
        if isinstance(artifact_or_path, Artifact):
            artifact = artifact_or_path
        else:
            path = Path(artifact_or_path)
            artifact = Artifact(name or f"run-{self.id}-{path.name}", type or "unspecified")
            if path.is_dir():
                artifact.add_dir(path)
            elif path.is_file():
                artifact.add_file(path)
            else:
                raise FileNotFoundError(f"nothing to log at {path}")
        return artifact._log(self._store, self.entity, self.project, self.id, aliases, tags)

    def use_artifact(self, artifact_or_name: Artifact | str, type: str | None = None,  # type: ignore[override]
                     aliases: Sequence[str] | None = None, use_as: str | None = None) -> Artifact:
        """Declare an artifact as an input of this run and return it (logged).

        A name is resolved like ``Api.artifact`` within the run's entity/project (``latest``
        when no version is given).  A draft artifact is first logged (without this run as its
        producer), with ``aliases``.
        """
        self._check_live()
        if isinstance(artifact_or_name, str):
            path = names.parse_artifact_path(artifact_or_name, default_entity=self.entity,
                                             default_project=self.project)
            record = self._store.resolve(path.entity, path.project, path.collection, path.selector or "latest")
            if type is not None and record.type != type:
                raise InvalidNameError(f"artifact {path} has type {record.type!r}, not {type!r}")
            artifact = Artifact._from_record(self._store, record)
        else:
            artifact = artifact_or_name
            if type is not None and artifact.type != type:
                raise InvalidNameError(f"artifact {artifact.name!r} has type {artifact.type!r}, not {type!r}")
            if artifact.is_draft():
                artifact._log(self._store, self.entity, self.project, None, aliases)
        artifact._use_as = use_as or artifact._use_as
        assert artifact.id is not None
        self._store.record_use(self.entity, self.project, self.id, artifact.id, use_as)
        return artifact

    def finish(self, exit_code: int | None = None) -> None:
        """Mark the run finished (crashed for a non-zero exit code) and stop being current."""
        global _current
        if self._finished:
            return
        self._finished = True
        for path, root in dict.fromkeys(self._save_at_end):
            if os.path.isfile(path):
                self.upload_file(path, root=root)
        self._save()
        self._store.finish_run(self.entity, self.project, self.id, "finished" if not exit_code else "crashed")
        with _current_lock:
            if _current is self:
                _current = None

    def _check_live(self) -> None:
        if self._finished:
            raise ArtifactFSError(f"run {self.path} is finished; start a new one with client.init()")

    def __enter__(self) -> LiveRun:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.finish(exit_code=1 if exc_type is not None else 0)


def current_run() -> LiveRun | None:
    return _current


def init(entity: str | None = None, project: str | None = None, job_type: str | None = None,
         name: str | None = None, config: dict[str, Any] | None = None, id: str | None = None,
         reinit: bool | str = False, store: str | None = None, tags: Sequence[str] | None = None,
         **_ignored: Any) -> LiveRun:
    """Start a run and make it the current one.

    ``reinit``: False returns the current run if one is active (W&B's script behaviour);
    True / "finish_previous" finishes it first; "create_new" starts another alongside.
    ``store`` overrides ARTIFACTFS_STORE for this run.  Other W&B keyword arguments are
    accepted and ignored so W&B scripts run unchanged.
    """
    global _current
    with _current_lock:
        previous = _current
    if previous is not None and not previous._finished:
        if reinit is False or reinit == "return_previous":
            return previous
        if reinit is True or reinit == "finish_previous":
            previous.finish()
    st = get_store(store)
    entity = names.validate_entity(entity or settings.default_entity())
    project = names.validate_project(project or settings.default_project())
    run_id = id or uuid.uuid4().hex[:8]
    record = st.create_run(entity, project, run_id, name=name, job_type=job_type, config=config)
    run = LiveRun(st, record, tags or ())
    with _current_lock:
        _current = run
        if not _exit_hook:
            _exit_hook.append(True)
            atexit.register(_finish_at_exit)
    return run


def log_artifact(artifact_or_path: Artifact | str | os.PathLike[str], name: str | None = None,
                 type: str | None = None, aliases: Sequence[str] | None = None,
                 tags: Sequence[str] | None = None) -> Artifact:
    """``wandb.log_artifact``: log through the current run (call ``init()`` first)."""
    run = _require_run("log_artifact")
    return run.log_artifact(artifact_or_path, name=name, type=type, aliases=aliases, tags=tags)


def use_artifact(artifact_or_name: Artifact | str, type: str | None = None,
                 aliases: Sequence[str] | None = None, use_as: str | None = None) -> Artifact:
    """``wandb.use_artifact``: declare an input of the current run (call ``init()`` first)."""
    run = _require_run("use_artifact")
    return run.use_artifact(artifact_or_name, type=type, aliases=aliases, use_as=use_as)


def save(glob_str: str | os.PathLike[str], base_path: str | os.PathLike[str] | None = None,
         policy: str = "live", glob: bool = True) -> list[str]:
    """``wandb.save``: save files with the current run (call ``init()`` first)."""
    return _require_run("save").save(glob_str, base_path, policy, glob)


def finish(exit_code: int | None = None) -> None:
    """``wandb.finish``: finish the current run, if any."""
    run = _current
    if run is not None:
        run.finish(exit_code)


def login(key: str | None = None, relogin: bool | None = None, host: str | None = None, **_ignored: Any) -> bool:
    """``wandb.login``: accepted so scripts run.  A ``key`` sets ARTIFACTFS_API_KEY for this
    process and a ``host`` ARTIFACTFS_STORE; the key is checked by the server on first use."""
    if key:
        os.environ["ARTIFACTFS_API_KEY"] = key
    if host:
        os.environ["ARTIFACTFS_STORE"] = host
    return True


_idle_config = Config()


def config() -> Config:
    """``wandb.config``: the current run's config (a detached one before ``init``)."""
    run = _current
    return run.config if run is not None else _idle_config


def _require_run(what: str) -> LiveRun:
    run = _current
    if run is None:
        raise ArtifactFSError(f"call client.init() before client.{what}()")
    return run


def _reset_for_tests() -> None:
    """Forget the current run and close cached stores (tests switch stores between cases)."""
    global _current
    with _current_lock:
        _current = None
    close_stores()
