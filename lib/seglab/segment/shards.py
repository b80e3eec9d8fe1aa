"""Sharded inference's outputs, checked: every tile in exactly one shard, with a mask that reads back.

``seglab predict --shard I/N`` (:mod:`seglab.segment.predict`) deals the sorted tiles round
robin (:func:`seglab.segment.predict.shard_of`) and writes ``tiles_shard-<I>-of-<N>.tsv`` beside the masks.

- :func:`shard_complete`: a shard's table lists all its tiles and every mask reads back.
- :func:`check_shards`: every tile present exactly once across the shards' tables.
- :func:`merge_shards`: the merge step (``seglab merge-shards``; the merge job of
  ``seglab submit-predict``): writes ``shards_check.json`` and the merged ``tiles.tsv``.
- :func:`read_shards_check`, :func:`merge_ok`: what the merge step found.

Nothing here talks to Slurm; :mod:`seglab.slurm` and :mod:`seglab.workflow.prepare` use it.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path

from seglab import SeglabError
from seglab.core import io
from seglab.segment import predict

CHECK_FILE = predict.CHECK_FILE   # what the merge step of sharded inference found


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def shard_complete(tiles_dir, out_dir, shard: int, n_shards: int) -> bool:
    """Whether shard ``shard`` of ``n_shards`` finished: its table lists all its tiles and every mask reads back."""
    try:
        names = predict.list_tiles(tiles_dir)
    except (OSError, SeglabError):
        return False
    out = Path(out_dir)
    mine = [n for i, n in enumerate(names) if predict.shard_of(i, n_shards) == shard]
    table = out / predict.table_name((shard, n_shards))
    if not mine or not table.is_file():
        return False
    import pandas as pd
    try:
        listed = set(pd.read_csv(table, sep="\t", dtype={"tile": str})["tile"])
    except Exception:  # noqa: BLE001  (a truncated table: the shard did not finish)
        return False
    return set(mine) <= listed and all(predict.mask_complete(out / f"{n}.tif") for n in mine)


@dataclass
class ShardCheck:
    n_tiles: int
    n_shards: int
    missing: list[str]                 # tiles no shard wrote
    duplicated: dict[str, list]        # tile -> the shards that each wrote it
    unexpected: list[str]              # rows for tiles not in the tiles folder
    per_shard: dict[int, int]          # shard -> tiles it reported

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicated or self.unexpected)


def check_shards(tiles: list[str], shard_tables: dict[int, list[str]]) -> ShardCheck:
    """Every tile present exactly once across the shards' tables.

    Parameters
    ----------
    tiles : list of str
        Every tile name of the cohort.
    shard_tables : dict of int -> list of str
        For each shard index, the tile names its per-tile table lists (one row per
        tile it wrote; a tile listed twice by one shard counts twice).
    """
    seen: dict[str, list] = {}
    for shard, names in sorted(shard_tables.items()):
        for name in names:
            seen.setdefault(str(name), []).append(shard)
    wanted = set(map(str, tiles))
    return ShardCheck(n_tiles=len(wanted), n_shards=len(shard_tables),
                      missing=sorted(wanted - set(seen)),
                      duplicated={t: s for t, s in sorted(seen.items()) if len(s) > 1},
                      unexpected=sorted(set(seen) - wanted),
                      per_shard={s: len(n) for s, n in sorted(shard_tables.items())})


def read_shards_check(out_dir) -> dict | None:
    """``shards_check.json`` of a prediction folder (what the merge step found), or None while
    there is none to read (the merge has not run, or the file is cut short)."""
    try:
        check = json.loads((Path(out_dir) / CHECK_FILE).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return check if isinstance(check, dict) else None


def merge_ok(out_dir, n_shards: int) -> bool:
    """A passing shards_check.json for this N, newer than every shard table."""
    out = Path(out_dir)
    check = read_shards_check(out)
    if check is None:
        return False
    tables = [out / predict.table_name((i, n_shards)) for i in range(n_shards)]
    newest = max((t.stat().st_mtime for t in tables if t.is_file()), default=float("inf"))
    return bool(check.get("ok")) and check.get("n_shards") == n_shards \
        and (out / CHECK_FILE).stat().st_mtime >= newest


def read_shard_tables(out_dir, n_shards: int) -> dict[int, list[str]]:
    """Tile ids per shard from ``seglab predict``'s tables ``tiles_shard-<I>-of-<N>.tsv`` in ``out_dir``.

    A shard without a table contributes nothing (its tiles then count as missing).
    Tables of another N (an earlier split) are ignored.
    """
    import pandas as pd
    out = Path(out_dir)
    result: dict[int, list[str]] = {}
    for i in range(n_shards):
        table = out / predict.table_name((i, n_shards))
        if not table.is_file():
            result[i] = []
            continue
        df = pd.read_csv(table, sep="\t", dtype={"tile": str})
        if "tile" not in df.columns:
            raise SeglabError(f"{table}: no 'tile' column; not a seglab predict table")
        result[i] = [str(t) for t in df["tile"]]
    return result


def merge_shards(tiles_dir, out_dir, n_shards: int, log=print) -> ShardCheck:
    """The merge job: every tile in exactly one shard table, with a mask that reads back.

    Writes ``shards_check.json`` (always) and ``tiles.tsv`` (the shard tables in one,
    sorted by tile; only when the check passes) in ``out_dir``. Raises SeglabError
    naming the missing, doubled, unknown and unreadable tiles.
    """
    import pandas as pd
    out = Path(out_dir)
    tiles = predict.list_tiles(tiles_dir)
    tables = read_shard_tables(out, n_shards)
    check = check_shards(tiles, tables)
    listed = {t for names in tables.values() for t in names}
    broken = sorted(t for t in listed & set(tiles) if not predict.mask_complete(out / f"{t}.tif"))
    record = {**check.__dict__, "ok": check.ok and not broken, "unreadable_masks": broken,
              "tiles_dir": str(tiles_dir), "out_dir": str(out), "checked": _now()}
    io.write_json(out / CHECK_FILE, record)
    if not record["ok"]:
        raise SeglabError(
            f"{out}: the {n_shards} shards do not give every tile exactly once: {len(check.missing)} missing "
            f"{check.missing[:5]}, {len(check.duplicated)} in two shards {list(check.duplicated)[:5]}, "
            f"{len(check.unexpected)} not in {tiles_dir} {check.unexpected[:5]}, {len(broken)} masks unreadable "
            f"{broken[:5]}; submit the shards again (seglab submit-predict skips complete shards and "
            "seglab predict skips finished tiles)")
    merged = pd.concat([pd.read_csv(out / predict.table_name((i, n_shards)), sep="\t", dtype={"tile": str})
                        for i in range(n_shards)], ignore_index=True).sort_values("tile")
    io.write_table(out / predict.MERGED_TABLE, merged)
    log(f"[seglab] {check.n_tiles} tiles, each written by exactly one of {n_shards} shards; "
        f"table {out / predict.MERGED_TABLE}")
    return check
