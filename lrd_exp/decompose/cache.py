"""A folder of small JSON tables, one file per key: what the measured rank decisions keep between runs (the layers'
device timings of ``policy=optimized``, the layers' damages of ``rank.allocation``). The key says what the numbers
depend on; a changed setting is a new key, so nothing stale is read."""

from __future__ import annotations

import json
import os

from lrd_exp.results.atomic import write_json_atomic


class TableCache:
    """``key -> {name: number}`` as ``<directory>/<key>.json`` (no directory: nothing is kept). Written atomically,
    so parallel jobs never read half a file; an unreadable file reads as empty and is measured again."""

    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> str | None:
        return os.path.join(self.directory, f"{key}.json") if self.directory else None

    def load(self, key: str) -> dict[str, float]:
        path = self._path(key)
        if not path or not os.path.isfile(path):
            return {}
        try:
            with open(path) as fh:
                return {k: float(v) for k, v in json.load(fh).items()}
        except (OSError, ValueError):
            return {}

    def save(self, key: str, table: dict[str, float]) -> None:
        path = self._path(key)
        if path:
            os.makedirs(self.directory, exist_ok=True)
            write_json_atomic(path, table)
