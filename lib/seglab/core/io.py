"""Atomic writes and content hashes.

Every file the library writes goes through here: it is written to a temporary
file in the same folder, flushed, fsynced and renamed over the target, so a
reader (or a run interrupted half-way) never sees half a file. A rename within
one file system is atomic on POSIX.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

CHUNK_BYTES = 1 << 20


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``.

    On an exception the temporary file is removed and ``target`` is untouched.
    With ``overwrite=False`` an existing target raises FileExistsError (checked
    before and, with ``os.link``, at the rename itself).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and target.exists():
        raise FileExistsError(f"{target} already exists and is never overwritten")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    # mkstemp makes the file 0600; give it the mode a plain open() would (the umask's),
    # so reports and tables stay readable by the group on a shared cluster.
    os.fchmod(fd, 0o666 & ~_current_umask())
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)  # fails if target appeared meanwhile
            tmp.unlink()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(target: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    with atomic_path(target, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    return write_bytes(target, text.encode("utf-8"), overwrite=overwrite)


def write_json(target: str | os.PathLike, obj: Any, *, overwrite: bool = True) -> Path:
    """JSON with sorted keys and a trailing newline; NaN is written as null."""
    text = json.dumps(_json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"
    return write_text(target, text, overwrite=overwrite)


def write_table(target: str | os.PathLike, df, *, overwrite: bool = True) -> Path:
    """A pandas DataFrame as CSV (``.csv``) or TSV (``.tsv``), written atomically."""
    target = Path(target)
    sep = "\t" if target.suffix == ".tsv" else ","
    with atomic_path(target, overwrite=overwrite) as tmp:
        df.to_csv(tmp, sep=sep, index=False)
    return target


def _json_safe(obj: Any) -> Any:
    import math

    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "shape", None) == ():
        obj = obj.item()  # numpy scalar
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: str | os.PathLike) -> str:
    """One hash over a file or a folder: every file's relative path and content.

    Hidden files and temporary files (``.*``) are left out, so an atomic write in
    progress does not change the hash.
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        h.update(str(rel.as_posix()).encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
