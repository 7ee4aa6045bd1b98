"""Per-peer JSONL metrics in a run directory: written line by line, read back for reports."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def peer_dir(run_dir: str | Path, peer_id: int) -> Path:
    return Path(run_dir) / f"peer-{peer_id}"


def _clean(v: Any) -> Any:
    # JSON has no NaN/Inf; keep the file parseable by any reader
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLog:
    """Append-only JSONL; each line flushed so a live view (or a crash) sees everything written so far."""

    def __init__(self, run_dir: str | Path, peer_id: int):
        self.dir = peer_dir(run_dir, peer_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.peer_id = peer_id
        self._f = open(self.dir / METRICS_FILE, "a", buffering=1)

    def write(self, event: str, **fields: Any) -> None:
        # cpu_s: this process's CPU seconds so far; with `time` it splits a peer's wall into CPU and waiting
        rec = {"event": event, "peer": self.peer_id, "time": time.time(), "cpu_s": time.process_time()}
        rec.update({k: _clean(v) for k, v in fields.items()})
        self._f.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()


def _read(f: Path) -> list[dict]:
    """The records of one metrics file. Lines that are not a JSON object are skipped: a torn last line (a peer
    killed mid-write) and, in a damaged file, other JSON values or bytes that are not UTF-8 (the file is ASCII)."""
    out = []
    for line in f.read_bytes().splitlines():
        try:
            r = json.loads(line.decode("utf-8"))
        # ValueError: JSONDecodeError, UnicodeDecodeError, an int over 4300 digits; RecursionError: "[[[[..." deep
        except (ValueError, RecursionError):
            continue
        if isinstance(r, dict):
            out.append(r)
    return out


def read_metrics(run_dir: str | Path) -> dict[int, list[dict]]:
    """All peers' records, by peer id; lines that are not a record (a torn last line) are skipped."""
    out: dict[int, list[dict]] = {}
    for d in sorted(Path(run_dir).glob("peer-*")):
        f = d / METRICS_FILE
        name = d.name.split("-", 1)[1]
        if not f.is_file() or not (name.isascii() and name.isdigit()):  # int() would also take "٣", " 3", "3_0"
            continue
        out[int(name)] = _read(f)
    return out


def records(run_dir: str | Path, peer_id: int, event: str | None = None) -> list[dict]:
    """One peer's records (of one event kind), read now; lines that are not a record (a torn last line) are skipped."""
    f = peer_dir(run_dir, peer_id) / METRICS_FILE
    recs = _read(f) if f.is_file() else []
    return [r for r in recs if event is None or r.get("event") == event]
