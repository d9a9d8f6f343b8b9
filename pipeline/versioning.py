"""Dataset versions as DVC identifies them, so a run records exactly which data it saw.

``dataset_version`` gives the hash ``dvc add`` would write for a file or folder, without a DVC
repository, via dvc-data (the library DVC itself hashes with); a run's version can thus be
matched against any ``.dvc`` file or ``dvc.lock`` entry.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from dvc_data.hashfile.build import build
from dvc_data.hashfile.db import HashFileDB
from dvc_objects.fs import MemoryFileSystem, localfs

from pipeline.errors import DatasetError

_STAGING = "memory://crosssim-dataset-version"


def dataset_version(path: Path) -> str:
    """DVC 3's md5 of ``path``: the file's md5, or ``<md5 of the sorted file list>.dir`` for a folder.

    Equal to what ``dvc add`` records, unless the folder holds files that a repository's
    ``.dvcignore`` excludes (no repository is consulted here).
    """
    path = Path(path).resolve()
    if not path.exists():
        raise DatasetError(f"{path}: cannot version a dataset that does not exist")
    # dry_run hashes without copying anything into an object store; the odb only names a staging area.
    odb = HashFileDB(MemoryFileSystem(), _STAGING)
    try:
        staging, _, obj = build(odb, str(path), localfs, "md5", dry_run=True)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the dataset to hash it ({exc})") from exc
    # For a folder, dvc-data leaves its file listing in fsspec's process-wide in-memory filesystem
    # (a temp file and a staging copy): drop them so a long-lived worker does not accumulate them.
    # (For a single file obj.path is the dataset file itself, on localfs: never touched.)
    leftovers = [(staging.fs, staging.path)]
    if isinstance(obj.fs, MemoryFileSystem):
        leftovers.append((obj.fs, obj.path))
    for fs, leftover in leftovers:
        if fs.exists(leftover):
            fs.rm(leftover, recursive=True)
    return str(obj.hash_info.value)


def dvc_tracked_version(dvc_file: Path) -> str | None:
    """The md5 recorded in a ``.dvc`` file's single output; None if the file or the md5 is absent."""
    dvc_file = Path(dvc_file)
    if not dvc_file.is_file():
        return None
    try:
        content = yaml.safe_load(dvc_file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DatasetError(f"{dvc_file}: not a readable .dvc file ({exc})") from exc
    outs = content.get("outs") if isinstance(content, dict) else None
    if not isinstance(outs, list) or len(outs) != 1 or not isinstance(outs[0], dict):
        raise DatasetError(f"{dvc_file}: expected exactly one entry under 'outs'")
    md5 = outs[0].get("md5")
    return str(md5) if md5 else None
