"""A compiler-output cache for the simulator runtime that every Verilator build recompiles.

Each Verilator build compiles, besides the design, the same five runtime sources
(``verilated.cpp``, ``verilated_vpi.cpp``, ``verilated_dpi.cpp``, ``verilated_threads.cpp``
and cocotb's ``verilator.cpp``): about 12 s of a ~15 s build on this project's 2-core
machine.  Verilator's generated Makefile prefixes every compile with ``$(OBJCACHE)`` (meant for
ccache); :func:`wrapper` writes a script that :mod:`sim.runner` passes there.  This module, run
as that script, serves ``c++ ... -c -o X.o SRC`` from ``STORE`` when ``SRC`` lies outside the
build directory and includes nothing from it (the runtime; cocotb's ``verilator.cpp``
includes the design's header and is never shared) and its key matches:
the whole command line, the working directory's name excluded, the source's contents, the
listing (name, size, mtime) of the source's folder and of the compiler executable.  A miss
compiles and stores the object and its ``-MMD`` dependency file; concurrent compilers of one
key each write a temporary file and rename it into place, so the store is never half-written.
Anything it does not recognise runs the command unchanged.

Usage (the generated wrapper): ``python objcache.py STORE CXX ARGS...``
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["wrapper", "cache_key", "main"]

_SOURCES = (".cpp", ".cc", ".c")


def cache_key(cmd: list[str], src: Path) -> str:
    """SHA-256 of what the object of ``cmd`` (a compile of ``src``) depends on."""
    h = hashlib.sha256(json.dumps(cmd).encode())
    h.update(src.read_bytes())
    for folder in (src.parent, *(p for p in (src.parent / "vltstd",) if p.is_dir())):
        for f in sorted(folder.iterdir()):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    exe = shutil.which(cmd[0])
    if exe:
        st = os.stat(exe)
        h.update(f"{os.path.realpath(exe)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _put(data: bytes, dest: Path) -> None:
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def _local_deps(dep: Path, cwd: Path) -> bool:
    """Whether the ``-MMD`` dependency file ``dep`` names a file of the build directory ``cwd``."""
    text = dep.read_text().replace("\\\n", " ")
    files = text.split(":", 1)[1].split() if ":" in text else []
    return any(cwd in (cwd / f).resolve().parents for f in files)


def main(argv: list[str]) -> int:
    """Run (or serve from the store) one compiler command; returns its exit status."""
    store, cmd = Path(argv[0]), argv[1:]
    srcs = [a for a in cmd if a.endswith(_SOURCES) and Path(a).is_file()]
    if "-c" not in cmd or "-o" not in cmd or len(srcs) != 1:
        return subprocess.call(cmd)
    src = Path(srcs[0]).resolve()
    cwd = Path.cwd().resolve()
    if cwd in src.parents:  # the design's own C++: never shared
        return subprocess.call(cmd)
    obj = Path(cmd[cmd.index("-o") + 1])
    dep = obj.with_suffix(".d")
    key = cache_key(cmd, src)
    hit_obj, hit_dep = store / f"{key}.o", store / f"{key}.d"
    if hit_obj.is_file():
        _put(hit_obj.read_bytes(), obj)
        if hit_dep.is_file():
            _put(hit_dep.read_bytes(), dep)
        return 0
    rc = subprocess.call(cmd)
    if rc == 0 and obj.is_file() and dep.is_file() and not _local_deps(dep, cwd):
        store.mkdir(parents=True, exist_ok=True)
        _put(dep.read_bytes(), hit_dep)
        _put(obj.read_bytes(), hit_obj)
    return rc


def wrapper(store: Path) -> Path | None:
    """Write ``store/objcache`` (a shell script running this module with this Python) and return
    its path, or None where make could not take it (a path with spaces or quotes)."""
    store = Path(store).resolve()
    script = store / "objcache"
    if any(c in str(script) + sys.executable + __file__ for c in " '\"\\$"):
        return None
    text = f"#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} {store} \"$@\"\n"
    store.mkdir(parents=True, exist_ok=True)
    if not script.is_file() or script.read_text() != text:
        _put(text.encode(), script)
        script.chmod(0o755)
    return script


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
