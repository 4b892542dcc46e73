"""A small cached pipeline: stages keyed by a hash of their inputs, resumable, forceable.

Each stage writes into ``<run_dir>/<stage>/`` and, last of all, ``<run_dir>/<stage>/stage.json``
holding its key, its result (JSON) and its wall time.  A stage is up to date when that file
exists and its key equals the hash of (stage name, stage version, the config sections the
stage reads, the keys of the stages it depends on).  So editing one config section re-runs
the stages that read it and everything downstream; an interrupted stage (no ``stage.json``)
re-runs; ``force_from=STAGE`` re-runs that stage and every later one.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["Stage", "Pipeline", "StageContext", "StageRecord"]


@dataclass
class StageContext:
    """What a stage function sees: its folder, the whole config, earlier stages' results."""
    name: str
    dir: Path
    config: dict
    results: dict[str, dict]
    run_dir: Path
    progress: bool = True
    records: dict[str, StageRecord] = field(default_factory=dict)  # earlier stages of this run


@dataclass(frozen=True)
class Stage:
    """A named step: ``fn(ctx) -> dict`` (JSON-able result); ``reads`` are the config
    sections it depends on, ``after`` the stages whose outputs it uses."""
    name: str
    fn: Callable[[StageContext], dict]
    reads: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    version: int = 1


@dataclass
class StageRecord:
    """One stage's outcome in a run."""
    name: str
    key: str
    ran: bool
    seconds: float
    result: dict = field(default_factory=dict)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Pipeline:
    """Ordered stages; ``run`` executes what is out of date and returns every record."""

    def __init__(self, stages: list[Stage]) -> None:
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate stage names in {names}")
        for i, s in enumerate(stages):
            for dep in s.after:
                if dep not in names[:i]:
                    raise ValueError(f"stage {s.name!r} depends on {dep!r}, which is not an earlier stage")
        self.stages = stages

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def keys(self, config: dict) -> dict[str, str]:
        """The cache key of every stage for ``config``."""
        keys: dict[str, str] = {}
        for s in self.stages:
            keys[s.name] = _digest({"stage": s.name, "version": s.version,
                                    "config": {k: config.get(k) for k in s.reads},
                                    "after": {d: keys[d] for d in s.after}})
        return keys

    def run(self, run_dir: Path, config: dict, *, force_from: str | None = None,
            progress: bool = True, log: Callable[[str], None] = print) -> list[StageRecord]:
        if force_from is not None and force_from not in self.names:
            raise KeyError(f"--from {force_from!r}: no such stage (stages: {', '.join(self.names)})")
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        keys = self.keys(config)
        forced = set(self.names[self.names.index(force_from):]) if force_from else set()
        results: dict[str, dict] = {}
        records: list[StageRecord] = []
        t_run = time.perf_counter()
        for s in self.stages:
            sdir = run_dir / s.name
            marker = sdir / "stage.json"
            old = json.loads(marker.read_text()) if marker.exists() else None
            if old is not None and old.get("key") == keys[s.name] and s.name not in forced:
                results[s.name] = old["result"]
                records.append(StageRecord(s.name, keys[s.name], False, old.get("seconds", 0.0), old["result"]))
                log(f"[{time.perf_counter() - t_run:7.1f} s] {s.name:<10} up to date ({sdir})")
                continue
            if sdir.exists():
                shutil.rmtree(sdir)
            sdir.mkdir(parents=True)
            log(f"[{time.perf_counter() - t_run:7.1f} s] {s.name:<10} running ...")
            t0 = time.perf_counter()
            result = s.fn(StageContext(s.name, sdir, config, results, run_dir, progress,
                                       {r.name: r for r in records}))
            seconds = round(time.perf_counter() - t0, 2)
            marker.write_text(json.dumps({"key": keys[s.name], "result": result, "seconds": seconds},
                                         indent=1, default=str))
            results[s.name] = json.loads(marker.read_text())["result"]
            records.append(StageRecord(s.name, keys[s.name], True, seconds, results[s.name]))
            log(f"[{time.perf_counter() - t_run:7.1f} s] {s.name:<10} done in {seconds:.1f} s")
        return records
