"""Making what was written survive a crash: fsync files and the folders that name them (a rename
is durable only once its folder is synced). Used for checkpoints and exported models."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync one file or folder."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, files before the folders holding them, then `folder`."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file() or path.is_dir():
            fsync_path(path)
    fsync_path(folder)
