"""Folders published whole: a finished folder takes the place of an earlier one only once it is
complete, and a crash at any point leaves one of the two intact."""

import os
import shutil
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_folder(new: Path, target: Path) -> None:
    """Rename the finished folder ``new`` to ``target``. A folder already at ``target`` is
    renamed aside first (``.old-<name>-<pid>``), put back if the second rename fails, and deleted
    once ``new`` is in place."""
    old = target.with_name(f".old-{target.name}-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if old.exists():
            os.replace(old, target)
        raise
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
