"""The DVC operations ingest needs, behind one small class.

DVC's own Python API (``dvc.repo.Repo``, what the ``dvc`` command runs) rather than a
subprocess: no second interpreter start per call, and failures arrive as exceptions.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import ConfigError, VersioningError
from pipeline.versioning import dvc_tracked_version


def dvc_file(target: Path) -> Path:
    """The ``.dvc`` file ``dvc add target`` writes (``data`` → ``data.dvc``)."""
    return target.with_name(target.name + ".dvc")


class DvcRepo:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def containing(cls, path: Path) -> DvcRepo:
        """The DVC repository ``path`` is in (the nearest folder above it holding ``.dvc/``)."""
        path = Path(path).resolve()
        for folder in (path, *path.parents):
            if (folder / ".dvc").is_dir():
                return cls(folder)
        raise ConfigError(f"{path} is not inside a DVC repository: run `git init && dvc init` at the project root")

    def version(self, target: Path) -> str | None:
        """The md5 the target's ``.dvc`` file records (None before the first ``dvc add``)."""
        return dvc_tracked_version(dvc_file(target))

    def add(self, target: Path) -> None:
        """``dvc add target``: hash it into the cache and rewrite its ``.dvc`` file."""
        self._run("add", lambda repo: repo.add([str(target)]))

    def push(self, target: Path, remote: str | None) -> None:
        """``dvc push target.dvc [-r remote]``: upload what the ``.dvc`` file names and the remote lacks."""
        self._run("push", lambda repo: repo.push(targets=[str(dvc_file(target))], remote=remote))

    def _run(self, command: str, operation) -> None:
        from dvc.exceptions import DvcException
        from dvc.repo import Repo

        try:
            with Repo(str(self.root)) as repo:
                # git is left alone (no autostage, no "git add" hint): the caller says what to commit
                repo.scm_context.autostage, repo.scm_context.quiet = False, True
                operation(repo)
        except DvcException as exc:
            raise VersioningError(f"`dvc {command}` failed in {self.root}: {exc}") from exc
