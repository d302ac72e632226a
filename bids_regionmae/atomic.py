"""File helpers: atomic writes (temporary name in the same folder, then rename) and checksums.

A killed process never leaves a half-written file under the final name, and
concurrent writers of the same file each replace it whole. Files get the
permissions of a plain ``open()`` under the process umask (``0644`` with the
usual ``022``), even when the writing library creates its temporary file
``0600`` (safetensors does).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def temporary_sibling(path: str | Path) -> Path:
    """A unique temporary name next to ``path`` that keeps its extension(s).

    Keeping the extension lets libraries that dispatch on it (nibabel,
    numpy, safetensors) write to the temporary name directly.
    """
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    return path.with_name(f".{stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def _umask() -> int:
    """The process umask, read without changing it where the system allows (Linux ``/proc``)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only where /proc is missing)
    os.umask(mask)
    return mask


def _apply_umask(path: Path) -> None:
    """Give a regular file the mode ``open()`` would have created it with (``0o666 & ~umask``)."""
    info = os.lstat(path)
    wanted = 0o666 & ~_umask()
    if stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) != wanted:
        with contextlib.suppress(PermissionError):  # a file system without modes keeps its own
            os.chmod(path, wanted)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success rename it to ``path``, on error remove it.

    A regular file written there gets the mode of a plain ``open()`` (``0o666``
    minus the umask) before the rename, whatever mode the writer created it with.

    Examples
    --------
    >>> with atomic_path(out / "x.nii.gz") as tmp:  # doctest: +SKIP
    ...     nib.save(img, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        _apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically and return ``path``."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def create_exclusive(path: str | Path, text: str) -> bool:
    """Create ``path`` with ``text`` only if it does not exist yet.

    The content is written to a temporary file and hard-linked into place, so
    concurrent callers never observe a partial file and exactly one wins.

    Returns
    -------
    bool
        True if this call created the file, False if it already existed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    tmp.write_text(text, encoding="utf-8")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in blocks (constant memory)."""
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            hasher.update(chunk)
    return hasher.hexdigest()
