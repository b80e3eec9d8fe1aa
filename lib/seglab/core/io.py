"""Atomic writes, output sets and content hashes.

Every file the library writes goes through here: it is written to a temporary
file in the same folder, flushed, fsynced and renamed over the target, so a
reader (or a run interrupted half-way) never sees half a file. A rename within
one file system is atomic on POSIX.

Temporary files are ``.<target name>.<random>.tmp`` beside the target. An
``OSError`` while writing one (no space, permission, read-only file system) is
raised again naming the target, never the temporary file, so the user reads the
path they asked for. A run killed by SIGKILL cannot remove its temporary file:
the next run removes it with :func:`clean_temps`.

Files that only mean something together (a table and the summaries made from it)
are written with :func:`write_set`: all of them or none, and a marker
``<set>.complete.json`` written last lists them with their sha256;
:func:`set_complete` is what a reader checks.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

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
        raise FileExistsError(errno.EEXIST, "already exists and is never overwritten", str(target))
    with naming_target(target):
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    # mkstemp makes the file 0600; give it the mode a plain open() would (the umask's),
    # so reports and tables stay readable by the group on a shared cluster.
    os.fchmod(fd, 0o666 & ~current_umask())
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with naming_target(target, tmp):
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


@contextlib.contextmanager
def naming_target(target: Path, *stand_ins: Path) -> Iterator[None]:
    """Raise an OSError again with ``target`` as its file name when it names none or a stand-in
    (a temporary file the user never asked for); its type (by errno) and cause are kept."""
    try:
        yield
    except OSError as exc:
        named = exc.filename
        if not isinstance(named, (str, os.PathLike)) or Path(named) in stand_ins or str(named).endswith(".tmp"):
            raise OSError(exc.errno, exc.strerror or str(exc), str(target)) from exc
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(target: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    with atomic_path(target, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    return write_bytes(target, text.encode("utf-8"), overwrite=overwrite)


def json_text(obj: Any) -> str:
    """JSON with sorted keys and a trailing newline; NaN is written as null."""
    return json.dumps(_json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json(target: str | os.PathLike, obj: Any, *, overwrite: bool = True) -> Path:
    """JSON with sorted keys and a trailing newline; NaN is written as null."""
    return write_text(target, json_text(obj), overwrite=overwrite)


def write_table(target: str | os.PathLike, df, *, overwrite: bool = True) -> Path:
    """A pandas DataFrame as CSV (``.csv``) or TSV (``.tsv``), written atomically."""
    target = Path(target)
    sep = "\t" if target.suffix == ".tsv" else ","
    with atomic_path(target, overwrite=overwrite) as tmp:
        df.to_csv(tmp, sep=sep, index=False)
    return target


# .<name>.<mkstemp's random part>.tmp, the names atomic_path and write_set give their temporaries
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp$")


def clean_temps(folder: str | os.PathLike, names) -> list[Path]:
    """Remove the temporary files (and staging folders) that an interrupted write of one of ``names``
    left in ``folder``; returns what was removed.

    Only the temporaries of the named targets go: a folder shared with other writers (the shards of
    a Slurm array) keeps theirs, which may be in use right now.
    """
    folder, names = Path(folder), set(names)
    removed = []
    if not folder.is_dir():
        return removed
    for f in folder.iterdir():
        m = _TEMP_RE.match(f.name)
        if not m or m["name"] not in names:
            continue
        if f.is_dir() and not f.is_symlink():
            shutil.rmtree(f, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
        removed.append(f)
    return removed


def set_marker(folder: str | os.PathLike, name: str) -> Path:
    """The completion marker of output set ``name`` in ``folder``: ``<name>.complete.json``."""
    return Path(folder) / f"{name}.complete.json"


def write_set(folder: str | os.PathLike, writers: Mapping[str, Callable[[Path], Any]], *, name: str) -> Path:
    """Write files that belong together (one result's table and summaries) as a set: all or none.

    Parameters
    ----------
    folder : where the files go (created).
    writers : ``{file name: writer}``; ``writer(path)`` writes that file at ``path`` (a path in a
        staging folder, never the final one).
    name : the set's name: the marker is ``<name>.complete.json``, the staging folder
        ``.<name>.<random>.tmp``.

    Every file is first written into a staging folder beside the targets; only when all are
    written (and fsynced) is the old marker removed, each file renamed into place and the marker
    written, listing each file with its sha256. A failure while staging (a full disk) leaves an
    earlier set untouched and still complete; a crash between the renames leaves no marker, so the
    set reads as incomplete. Staging leftovers of an interrupted earlier call are removed first.
    Returns the marker's path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean_temps(folder, [name, *writers, set_marker(folder, name).name])
    with naming_target(folder):
        stage = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=folder))
    try:
        for fname, write in writers.items():
            with naming_target(folder / fname, stage / fname):
                write(stage / fname)
                with open(stage / fname, "rb+") as fh:
                    os.fsync(fh.fileno())
        marker = set_marker(folder, name)
        with naming_target(marker):
            marker.unlink(missing_ok=True)
        for fname in writers:
            with naming_target(folder / fname, stage / fname):
                os.replace(stage / fname, folder / fname)
        write_text(marker, json_text({"set": name, "files": {f: sha256_file(folder / f) for f in writers}}))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return marker


def set_complete(folder: str | os.PathLike, name: str) -> bool:
    """Whether output set ``name`` in ``folder`` is whole: its marker is there and every file it
    lists has the content it was written with."""
    try:
        listed = json.loads(set_marker(folder, name).read_text())["files"]
        return all(sha256_file(Path(folder) / f) == h for f, h in listed.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


@contextlib.contextmanager
def quiet_tiff_log() -> Iterator[None]:
    """Silence tifffile's logger while reading files that are checked anyway.

    tifffile logs each damaged tag of a broken file (``<TiffTag.fromfile> raised TiffFileError``)
    before it raises; those lines came before the one-line error that names the file and the fix.
    """
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        log.setLevel(level)


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
