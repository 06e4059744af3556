"""Write files and directories so that a crash never leaves a half-written one in place.

The pattern everywhere: write into a temporary sibling, fsync, then `os.replace` — a rename is
atomic on POSIX, so readers see either the old complete thing or the new complete thing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (the directory entry itself must hit the disk)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_permissions(path: Path) -> None:
    """Temporary files and dirs are created private (0600/0700); give the published result the
    permissions an ordinary file would have, so teammates and other jobs can read checkpoints."""
    mask = _umask()
    if path.is_dir():
        for dirpath, dirnames, filenames in os.walk(path):
            os.chmod(dirpath, 0o777 & ~mask)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _usual_permissions(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def save_json(path: str | Path, data: dict) -> None:
    """A JSON file for people to read (indented); values JSON cannot hold are written as strings."""
    write_text(path, json.dumps(data, indent=1, default=str))


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


@contextlib.contextmanager
def staged_dir(final: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it is fsynced and renamed to `final`.

    On any exception the temporary directory is removed and `final` is untouched. With
    `replace=True` an existing `final` is swapped out only after the new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        publish_dir(tmp, final, replace=replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(tmp: Path, final: Path, *, replace: bool = False) -> None:
    """fsync a completely written directory, then rename it to `final` (the commit point)."""
    _usual_permissions(tmp)
    fsync_tree(tmp)
    if final.exists():
        if not replace:
            raise FileExistsError(f"{final} already exists")
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)
