"""Fuzz the decoder with mutated licforge files: every case decodes to an image of the size
its header declares or is refused with a one-line error (exit 2 on the command line); no
crash, no hang, bounded memory.

The cases (seeded) mutate the files of a small image (32 x 48, latents 2 x 3) made with the
N=16 bundle and with the float N=16 student: bit flips, runs of bytes, truncations,
extensions, header fields (edge and random values, sizes kept consistent or not), payload
bits; about half get their CRC32 recomputed, so that the header parser, the payload check
and CompressAI's rANS decoder see them; adversarial rANS strings crafted by
``helpers.rans64_encode`` (endless bypass counts, all-ones, tiny) complete the set.  All are
decoded in ONE child process whose address space is capped at 1 GiB above what its imports
took, under a timeout: a crash (segfault in the C++ decoder), a hang or a runaway allocation
fails the test instead of the test run.  A sample is then run through ``licforge decode``.
"""
from __future__ import annotations

import json
import pickle
import re
import struct
import subprocess
import sys
import textwrap
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import rans64_encode
from PIL import Image

from licforge.flows.cli import main
from licforge.models.data import embedded_images
from licforge.quant.codec import encode_image, load_model
from licforge.quant.container import BitstreamError, read_file

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "models/checkpoints/bundles/student_n16_photos_hybrid8"
STUDENT = ROOT / "models/checkpoints/student_n16_photos_l0.0130.pt"
SEED, CASES = 17, 1400  # 1200 on the bundle's file, 200 on the float model's
FIELDS = {"version": (4, ">B"), "kind": (5, ">B"), "pad": (6, ">B"), "count": (7, ">B"), "H": (8, ">H"),
          "W": (10, ">H"), "C": (12, ">H"), "h": (14, ">H"), "w": (16, ">H"), "model": (18, ">B"),
          "tables": (50, ">B"), "length": (82, ">I")}

CHILD = textwrap.dedent("""
    import json, pickle, resource, sys, time
    import torch
    torch.set_num_threads(1)
    from licforge.quant.codec import decode_image, load_model
    from licforge.quant.container import BitstreamError
    models = {"bundle": load_model(sys.argv[1]), "float": load_model(sys.argv[2])}
    with open(sys.argv[3], "rb") as f:
        cases = pickle.load(f)
    vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
    out = []
    for key, data in cases:
        t0 = time.perf_counter()
        try:
            res = ["ok", list(decode_image(models[key], data).shape)]
        except BitstreamError as e:
            res = ["error", str(e)]
        except BaseException as e:
            res = ["crash", type(e).__name__ + ": " + str(e)]
        out.append(res + [time.perf_counter() - t0])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(sys.argv[4], "w") as f:
        json.dump({"results": out, "limit_bytes": vm + (1 << 30), "max_rss_bytes": rss}, f)
""")


def _crc(data: bytearray) -> bytes:
    if len(data) >= 4:
        struct.pack_into(">I", data, len(data) - 4, zlib.crc32(bytes(data[:-4])))
    return bytes(data)


def _mutate(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """One mutation of ``data`` (a file with one payload string) and its kind."""
    out, n = bytearray(data), len(data)
    kind = rng.choice(["bits", "bytes", "truncate", "extend", "field", "payload", "size"])
    if kind == "bits":
        for _ in range(rng.integers(1, 5)):
            i = rng.integers(0, 8 * n)
            out[i // 8] ^= 1 << (i % 8)
    elif kind == "bytes":
        i, k = rng.integers(0, n), rng.integers(1, 17)
        fill = rng.choice(["random", "zero", "ones"])
        run = {"random": rng.integers(0, 256, k).tolist(), "zero": [0] * k, "ones": [255] * k}[fill]
        out[i:i + k] = bytes(run)[: max(0, n - i)]
    elif kind == "truncate":
        out = out[: rng.integers(0, n)]
    elif kind == "extend":
        out += bytes(rng.integers(0, 256, rng.integers(1, 17)).tolist())
    elif kind == "payload":
        i = rng.integers(86 * 8, (n - 4) * 8)
        out[i // 8] ^= 1 << (i % 8)
    elif kind == "size":  # H, W moved within the same latent grid: still a valid file
        h, w = struct.unpack_from(">2H", data, 14)
        struct.pack_into(">2H", out, 8, rng.integers(16 * h - 15, 16 * h + 1), rng.integers(16 * w - 15, 16 * w + 1))
        return kind, _crc(out)
    else:
        name = rng.choice(list(FIELDS))
        off, fmt = FIELDS[name]
        top = (1 << (8 * struct.calcsize(fmt))) - 1
        old = struct.unpack_from(fmt, data, off)[0]
        value = int(rng.choice([0, 1, top, old + 1, old - 1 if old else 2, rng.integers(0, top + 1)]))
        struct.pack_into(fmt, out, off, value & top)
        kind = f"field:{name}"
    return kind, (_crc(out) if rng.random() < 0.5 else bytes(out))


def _adversarial(data: bytes, bundle) -> list[tuple[str, bytes]]:
    """Hand-made payloads behind a valid header and CRC: the escape symbol of channel 0 and an
    endless bypass count, all ones, all zeros, a bare 8-byte string, and a tiny payload under a
    header declaring the largest latent grid."""
    header, _ = read_file(data)
    t = bundle.layer("latent").tensors
    esc = int(t["cdf_length"][0]) - 2
    escape = ("sym", int(t["cdf"][0][esc]), int(t["cdf"][0][esc + 1] - t["cdf"][0][esc]))

    def wrap(payload: bytes, hw: tuple[int, int] = header.size) -> bytes:
        head = bytearray(data[:86])
        struct.pack_into(">4H", head, 8, hw[0], hw[1], 24, -(-hw[0] // 16))
        struct.pack_into(">H", head, 16, -(-hw[1] // 16))
        struct.pack_into(">I", head, 82, len(payload))
        return _crc(bytearray(bytes(head) + payload + bytes(4)))

    return [("crafted:bypass", wrap(rans64_encode([escape] + [("bits", 15)] * 64))),
            ("crafted:ones", wrap(b"\xff" * 64)), ("crafted:zeros", wrap(bytes(64))),
            ("crafted:bare", wrap(rans64_encode([]))),
            ("crafted:largest", wrap(rans64_encode([escape] * 4), (4096, 4096)))]


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    """(cases, child results) of the whole run."""
    img = embedded_images("held-out")["astronaut"][200:232, 200:248]
    bundle = load_model(BUNDLE)
    files = {"bundle": encode_image(bundle, img), "float": encode_image(load_model(STUDENT), img)}
    rng = np.random.default_rng(SEED)
    cases = [("bundle", "original", files["bundle"]), ("float", "original", files["float"])]
    cases += [(key, *_mutate(files[key], rng)) for key in ["bundle"] * 1200 + ["float"] * 200]
    cases += [("bundle", *c) for c in _adversarial(files["bundle"], bundle)]
    d = tmp_path_factory.mktemp("fuzz")
    (d / "cases.pkl").write_bytes(pickle.dumps([(k, data) for k, _, data in cases]))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(BUNDLE), str(STUDENT), str(d / "cases.pkl"),
                           str(d / "results.json")], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"the decoder process died ({proc.returncode}): {proc.stderr[-2000:]}"

    return cases, json.loads((d / "results.json").read_text()), d


def _declared(data: bytes) -> list[int]:
    h, _ = read_file(data)
    return [h.height, h.width, 3]


def test_every_mutated_file_decodes_or_is_refused_in_one_line(fuzz):
    cases, res, _ = fuzz
    results = res["results"]
    assert len(cases) == len(results) >= 1000 + 7
    crashes = [(c[1], r[1]) for c, r in zip(cases, results) if r[0] == "crash"]
    assert crashes == []
    for (key, kind, data), (status, what, _) in zip(cases, results):
        if status == "ok":
            assert what == _declared(data), (key, kind)
        else:
            assert what and "\n" not in what, (key, kind, what)
    assert max(r[2] for r in results) < 5.0  # no hang: the slowest case, in seconds
    assert res["max_rss_bytes"] < res["limit_bytes"]


def test_the_fuzz_reaches_every_layer_of_the_decoder(fuzz):
    """Enough cases pass the CRC to exercise the header checks and the payload check, some
    reach CompressAI's decoder and decode, and each crafted payload is refused."""
    cases, res, _ = fuzz
    results = res["results"]
    reasons = Counter(r[1].split(":")[0] if r[0] == "error" else "ok" for r in results)
    assert reasons["file corrupt"] >= 200  # CRC32 mismatch
    assert reasons["payload corrupt"] >= 100  # payload bits with the CRC recomputed
    assert sum(v for k, v in reasons.items() if k.startswith("latent size")) >= 20
    assert sum(1 for c, r in zip(cases, results) if r[0] == "ok" and c[1] == "size") >= 50
    crafted = {c[1]: r for c, r in zip(cases, results) if c[1].startswith("crafted")}
    assert crafted["crafted:bypass"][1].startswith("payload corrupt: a bypass-coded value longer than 28 bits")
    assert re.match(r"payload of \d+ bytes is too short for the 1572864 latent symbols", crafted["crafted:largest"][1])
    assert all(r[0] == "error" for r in crafted.values())
    assert results[0][:2] == ["ok", [32, 48, 3]] and results[1][:2] == ["ok", [32, 48, 3]]


def test_a_sample_exits_2_with_one_line_on_the_command_line(fuzz, tmp_path, capsys):
    """The child showed every case safe; a sample of each outcome through ``licforge decode``."""
    cases, res, _ = fuzz
    picked, seen = [], set()
    for (key, kind, data), (status, what, _) in zip(cases, res["results"]):
        tag = (key, status, " ".join(what.split()[:2]) if status == "error" else kind == "original")
        if tag not in seen:
            seen.add(tag)
            picked.append((key, data, status, what))
    assert len(picked) >= 15
    for i, (key, data, status, what) in enumerate(picked):
        f, png = tmp_path / f"{i}.licf", tmp_path / f"{i}.png"
        f.write_bytes(data)
        rc = main(["decode", str(f), "--model", str(BUNDLE if key == "bundle" else STUDENT), "--out", str(png)])
        err = capsys.readouterr().err.strip()
        if status == "ok":
            assert rc == 0 and list(np.asarray(Image.open(png)).shape) == what
        else:
            assert rc == 2 and err == f"licforge: error: file {f}: {what}", (err, what)
    with pytest.raises(BitstreamError):
        read_file(b"")
