"""The simulator build cache of sim.runner: what its key covers, one build per key among processes."""
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from licforge.sim.runner import _build_once, build_key, run_cocotb

TOP = "module top(input wire clk); endmodule\n"
ROM = 'module rom; reg [7:0] m [0:3]; initial $readmemh("w.hex", m); endmodule\n'


def _design(folder: Path, top: str = TOP, hex_words: str = "00\n") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "top.v").write_text(top)
    (folder / "rom.v").write_text(ROM)
    (folder / "w.hex").write_text(hex_words)
    return [folder / "top.v", folder / "rom.v"]


def test_key_follows_the_sources_contents_not_their_folder_nor_the_rom_words(tmp_path):
    key = build_key(_design(tmp_path / "a"), "top", "verilator")
    assert len(key) == 64
    assert build_key(_design(tmp_path / "b", hex_words="ff\n"), "top", "verilator") == key
    assert build_key(_design(tmp_path / "c", top=TOP + "// changed\n"), "top", "verilator") != key
    assert build_key(_design(tmp_path / "a"), "rom", "verilator") != key
    assert build_key(_design(tmp_path / "a"), "top", "icarus") != key
    assert build_key(_design(tmp_path / "a"), "top", "verilator", fast=True) != key  # -O0 and -Os builds
    assert build_key(_design(tmp_path / "a")[::-1], "top", "verilator") != key
    renamed = tmp_path / "a" / "top2.v"
    renamed.write_text(TOP)
    assert build_key([renamed, tmp_path / "a" / "rom.v"], "top", "verilator") != key


def test_run_cocotb_takes_a_build_dir_or_a_cache_dir(tmp_path):
    for dirs in ({}, {"build_dir": tmp_path / "b", "cache_dir": tmp_path / "c"}):
        with pytest.raises(ValueError, match="needs one of build_dir .* and cache_dir"):
            run_cocotb(sources=[], toplevel="top", test_module="m", test_dir=tmp_path / "t", **dirs)


def _slow_build(entry: Path, log: Path) -> None:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(0.5)
    entry.mkdir(parents=True)
    (entry / "sim").write_text("built")


def _builder(entry: Path, log: Path) -> None:
    _build_once(entry, lambda into: _slow_build(into, log))


def test_concurrent_builders_of_one_key_build_it_once(tmp_path):
    entry, log = tmp_path / "cache" / "verilator-k", tmp_path / "builds.log"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_builder, args=(entry, log)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(log.read_text().split()) == 1
    assert (entry / "sim").read_text() == "built" and (entry / "BUILT").is_file()
    _builder(entry, log)  # a finished entry is reused
    assert len(log.read_text().split()) == 1


def test_a_failed_or_half_done_build_is_built_anew(tmp_path):
    entry, log = tmp_path / "verilator-k", tmp_path / "builds.log"

    def failing(into: Path) -> None:
        into.mkdir()
        (into / "partial.o").write_text("")
        raise RuntimeError("Command failed with return code: 2")

    with pytest.raises(RuntimeError, match="return code: 2"):
        _build_once(entry, failing)
    assert not (entry / "BUILT").exists()
    _builder(entry, log)
    assert sorted(p.name for p in entry.iterdir()) == ["BUILT", "sim"]
    assert len(log.read_text().split()) == 1


def _fake_compiler(tmp_path: Path) -> tuple[Path, Path]:
    """A 'compiler' that logs each call and writes ``-o`` (the source's bytes) and an -MMD file
    naming the source and, when the source asks for it, a header of the build directory."""
    log = tmp_path / "calls.log"
    cc = tmp_path / "cc"
    cc.write_text(f"""#!/bin/sh
echo "$@" >> {log}
while [ "$1" != "-o" ]; do shift; done
obj=$2; src=$3
cp "$src" "$obj"
if grep -q LOCAL "$src"; then echo "${{obj%.o}}.o: $src Vtop.h" > "${{obj%.o}}.d"; else echo "${{obj%.o}}.o: $src" > "${{obj%.o}}.d"; fi
""")
    cc.chmod(0o755)
    return cc, log


def test_objcache_compiles_the_runtime_once_and_never_shares_design_files(tmp_path, monkeypatch):
    from licforge.sim.objcache import main as objcache

    cc, log = _fake_compiler(tmp_path)
    runtime, store = tmp_path / "include", tmp_path / "store"
    runtime.mkdir()
    (runtime / "verilated.cpp").write_text("int runtime;\n")
    (runtime / "cocotb.cpp").write_text("// LOCAL: includes Vtop.h\n")
    builds = [tmp_path / f"build{i}" for i in range(3)]

    def compile_in(build: Path, src: Path) -> bytes:
        build.mkdir(exist_ok=True)
        monkeypatch.chdir(build)
        obj = src.stem + ".o"
        assert objcache([str(store), str(cc), "-I.", "-MMD", "-Os", "-c", "-o", obj, str(src)]) == 0
        assert (build / (src.stem + ".d")).is_file()
        return (build / obj).read_bytes()

    def calls() -> int:
        return len(log.read_text().splitlines()) if log.exists() else 0

    assert compile_in(builds[0], runtime / "verilated.cpp") == b"int runtime;\n" and calls() == 1
    assert compile_in(builds[1], runtime / "verilated.cpp") == b"int runtime;\n" and calls() == 1  # a hit
    assert sorted(p.suffix for p in store.iterdir()) == [".d", ".o"]
    (runtime / "verilated.cpp").write_text("int runtime2;\n")  # new contents: a miss
    assert compile_in(builds[2], runtime / "verilated.cpp") == b"int runtime2;\n" and calls() == 2
    for b in builds[:2]:  # a source that includes a file of its build directory is compiled every time
        compile_in(b, runtime / "cocotb.cpp")
    assert calls() == 4
    (builds[0] / "Vtop__ALL.cpp").write_text("int design;\n")
    for _ in range(2):  # the design's own files likewise
        compile_in(builds[0], builds[0] / "Vtop__ALL.cpp")
    assert calls() == 6 and len(list(store.iterdir())) == 4
