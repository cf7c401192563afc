"""Coverage-guided fuzzing of every parser that takes outside bytes (atheris, i.e. libFuzzer).

    python benchmarks/fuzz.py --seconds 30                 # every target, 30 s each
    python benchmarks/fuzz.py --seconds 60 --target envelope --findings fuzz-findings
    python benchmarks/fuzz.py --slice                      # the seeded slice, without atheris

A target is a function of bytes that must return or raise its parser's documented error
(EnvelopeError, CodecError, ManifestError, ConfigError, EdgeConfigError, ProfileError), within
SLOW_SECONDS (a parser that is quadratic in a 64 KiB header is a denial of service). Any other
exception, or a slower input, is a finding: its input is written to FINDINGS/<target>/<sha256> (with the traceback
beside it, .txt) and fuzzing goes on. Each target runs in its own process, instrumented for
coverage, seeded with valid inputs and a dictionary of hostile tokens (deep nesting, huge
integers, NaN and Infinity, lone surrogates); the table reports libFuzzer's executions, coverage
edges (cov) and features (ft), and the findings.

`replay` is the fast seeded slice the test suite runs (tests/test_parsers_fuzz.py): the seeds, the
hostile corpus and a few hundred deterministic mutations per target, no atheris needed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Instrumented for coverage in a fuzzing worker: the parsers, and the pure-Python TOML parser.
INSTRUMENTED = ["edge_sdk.protocol", "edge_sdk.codec", "edge_sdk.validation", "edge_sdk.runtime",
                "edge_sdk.agent.config", "coordinator.config", "coordinator.service.config",
                "device_profiles", "tomllib"]
MIN_EXECUTIONS = 5000
MAX_INPUT_BYTES = 16384
SLOW_SECONDS = 2.0  # typical inputs take under 10 ms

# What broke the parsers before (issue 11), as tokens to splice: the dictionary libFuzzer mutates
# with, and the alphabet of the slice's mutator.
TOKENS = [b"[", b"]", b"{", b"}", b'"', b"\\", b":", b",", b"=", b"\n", b"null", b"true", b"-0",
          b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400", b"inf", b"nan", b"+inf",
          b"\\ud800", b"\\udfff", b"\\u0000", b"\xff", b"\xc3\x28", b"\x00", b"9" * 21,
          b"9" * 5000, b"0x" + b"f" * 64, b"[" * 40, b'{"a":' * 40, b"a = [" * 40, b"\n[a]\n",
          b"\n[[a]]\n", b"/../../tmp/x", b"dev1\n", b'\\"', b'a\\"' * 8]


class SlowInput(Exception):
    """An input the target took more than SLOW_SECONDS on."""


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], Any]
    errors: tuple[type[Exception], ...]  # what the parser documents; anything else is a finding
    seeds: tuple[bytes, ...]
    hostile: tuple[bytes, ...] = ()      # inputs of this target's own framing that broke it once


TARGET_NAMES = ["codec", "envelope", "header-register", "header-task", "header-update",
                "header-ack", "header-refusal", "header-status", "header-artifact", "manifest",
                "edge-config", "service-config", "profile"]


def build_targets(workdir: Path) -> dict[str, Target]:
    """Every target, keyed by name; file parsers read a file in `workdir`, rewritten per input."""
    import json

    import numpy as np
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from coordinator.config import ConfigError, load_config
    from coordinator.service.config import ServiceSettings
    from device_profiles import ProfileError, catalogue_profile, load_profile
    from edge_sdk import codec
    from edge_sdk.agent.config import EdgeConfigError, load_edge_config
    from edge_sdk.protocol import (MAGIC, EnvelopeError, MessageType, decode_envelope,
                                   encode_envelope, parse_header, peek_header, signing)
    from edge_sdk.runtime.manifest import ManifestError, load_manifest

    def via_file(name: str, load: Callable[[Path], Any]) -> Callable[[bytes], Any]:
        path = workdir / name
        def run(data: bytes) -> Any:
            path.write_bytes(data)
            return load(path)
        return run

    # codec: decoded as a receiver without the model would, and against a small model
    shapes = {"dense": (3, 4), "bitmap": (40,), "varint": (500,), "scalar": (), "known": (16,)}
    known = {"known": np.array([1, 3, 5, 7], dtype=np.int64)}
    rng = np.random.default_rng(0)
    tensors = {
        "dense": codec.SparseTensor.from_dense(rng.normal(size=(3, 4))),
        "bitmap": codec.SparseTensor.from_dense(rng.normal(size=40), rng.random(40) < 0.5),
        "varint": codec.SparseTensor.from_dense(rng.normal(size=500), rng.random(500) < 0.02),
        "scalar": codec.SparseTensor.from_dense(np.float32(1.5)),
        "known": codec.SparseTensor((16,), known["known"], np.ones(4, np.float32)),
    }
    signs = {"known": codec.SparseTensor((16,), known["known"], np.array([1, -1, 1, -1], np.float32))}
    codec_seeds = (codec.encode(tensors, known_indices={"known"}),
                   codec.encode(tensors, codec.ValueDtype.FLOAT16, known_indices={"known"}),
                   codec.encode(signs, codec.ValueDtype.SIGN1, known_indices={"known"}),
                   codec.encode({}))

    def run_codec(data: bytes) -> Any:
        try:
            codec.decode(data, max_decoded_bytes=1 << 20)
        except codec.CodecError:
            pass
        return codec.decode(data, expected_shapes=shapes, known_indices=known)

    # envelopes and headers
    key = Ed25519PrivateKey.generate()
    task_key = {"device_id": "pi-7", "round": 2, "task": "0123abcd", }
    headers = {
        MessageType.REGISTER: {"device_id": "pi-7", "profile": catalogue_profile("rpi4-2gb").model_dump(mode="json"),
                               "num_samples": 300, "formats": ["onnx"], "epsilon_spent": 1.5,
                               "epsilon_budget": 8.0, "model_digest": "ab12"},
        MessageType.TASK: signing.sign({**task_key, "plan": {"width_ratio": 0.5, "uploaded": ["fc.w"]},
                                        "train": {"lr": 0.01}, "dp": {"noise_multiplier": 1.1},
                                        "planned_rounds": 5, "deadline": 1.7e9, "width_ratio": 0.5},
                                       b"", key),
        MessageType.UPDATE: {**task_key, "num_samples": 300, "epsilon": 0.5, "train_seconds": 2.5,
                             "local_accuracy": 0.8, "payload_sha256": "0" * 64},
        MessageType.ACK: {**task_key, "accepted": False, "duplicate": False, "reason": "late"},
        MessageType.REFUSAL: {**task_key, "code": "privacy_budget", "message": "over budget",
                              "epsilon": 7.9},
        MessageType.STATUS: {"device_id": "pi-7", "online": True},
        MessageType.ARTIFACT: signing.sign({"device_id": "pi-7", "round": 1, "task": "0123abcd",
                                            "manifest": {"device_id": "pi-7", "artifacts": []},
                                            "artifact": "model-fp32.onnx"}, b"", key),
    }
    public = key.public_key()

    def header_target(kind: MessageType) -> Callable[[bytes], Any]:
        def run(data: bytes) -> Any:
            envelope = decode_envelope(MAGIC + bytes([1, kind, 0, 0]) + struct.pack(">II", len(data), 0) + data)
            header = parse_header(envelope, kind)
            if kind in (MessageType.TASK, MessageType.ARTIFACT):
                signing.verify(envelope.header, envelope.payload, public)
            return header
        return run

    def run_envelope(data: bytes) -> Any:
        peek_header(data)
        return decode_envelope(data, payload_limit=1 << 16)

    envelope_seeds = tuple(encode_envelope(kind, header, codec_seeds[0] if kind == MessageType.UPDATE else b"")
                           for kind, header in headers.items())

    def raw_envelope(head: bytes) -> bytes:
        return MAGIC + bytes([1, MessageType.UPDATE, 0, 0]) + struct.pack(">II", len(head), 0) + head
    hostile_envelopes = tuple(raw_envelope(head) for head in (
        b"[" * 50000, b'{"a":' * 5000, b'{"n":' + b"9" * 5000 + b"}", b'{"e":NaN}', b'{"e":1e999}',
        b'{"s":"\\ud800"}', b'{"s":"\xff"}', b'"' + b'a\\"' * 21000))

    manifest = {
        "device_id": "pi-7", "round": 3, "model": "fedp3_cnn", "spec": {"layers": [{"kind": "conv"}]},
        "spec_digest": "abc", "width_ratio": 0.5, "dataset": "fashion-mnist",
        "input_shape": [1, 28, 28], "input_scale": 255.0, "mean": [0.28], "std": [0.35],
        "labels": ["a", "b"], "parameters": 10, "nonzero_parameters": 8, "sparsity": 0.2,
        "macs_per_sample": 100, "flops_per_sample": 200, "exporters": {"torch": "2"},
        "created_at": "2026-01-01T00:00:00Z",
        "artifacts": [{"format": "onnx", "precision": "fp32", "path": "model-fp32.onnx", "bytes": 10,
                       "sha256": "0" * 64, "compressed_path": "model-fp32.onnx.zst",
                       "compressed_bytes": 9, "parity": {"runtime": "onnxruntime",
                                                         "runtime_version": "1", "samples": 4,
                                                         "max_abs_diff": 0.0, "top1_agreement": 1.0}}],
    }
    targets = [
        Target("codec", run_codec, (codec.CodecError,), codec_seeds),
        Target("envelope", run_envelope, (EnvelopeError,), envelope_seeds, hostile_envelopes),
        *(Target(f"header-{kind.name.lower()}", header_target(kind), (EnvelopeError,),
                 (json.dumps(header).encode(), json.dumps(header, indent=1).encode()))
          for kind, header in headers.items()),
        Target("manifest", via_file("manifest.json", load_manifest), (ManifestError,),
               (json.dumps(manifest).encode(), json.dumps(manifest, indent=2).encode())),
        Target("edge-config", via_file("edge.toml", load_edge_config), (EdgeConfigError,),
               ((ROOT / "deploy" / "edge.example.toml").read_bytes(), b'device_id = "pi-7"\n')),
        Target("service-config", via_file("coordinator.toml",
                                          lambda path: load_config(path, schema=ServiceSettings)),
               (ConfigError,), ((ROOT / "deploy" / "coordinator.example.toml").read_bytes(),
                                b"[train]\nlr = 0.1\n[dp]\ntarget_epsilon = 4.0\n")),
        Target("profile", via_file("profile.json", load_profile), (ProfileError,),
               (catalogue_profile("rpi4-2gb").model_dump_json().encode(),)),
    ]
    assert [t.name for t in targets] == TARGET_NAMES
    return {t.name: t for t in targets}


def scratch_dir(label: str) -> Path:
    """A new folder for the file targets' input, in memory where there is a tmpfs: each input is
    a file write, ~30x slower on a disk-backed /tmp."""
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=f"fedprune-fuzz-{label}-", dir=where))


def escaped(target: Target, data: bytes) -> Exception | None:
    """The exception `data` makes escape from `target` other than its documented error, or
    SlowInput if it took too long either way."""
    start = time.perf_counter()
    try:
        target.run(data)
    except target.errors:
        pass
    except Exception as exc:  # noqa: BLE001 - that is the point: anything else is a finding
        return exc
    took = time.perf_counter() - start
    return SlowInput(f"{took:.1f} s for {len(data):,} bytes") if took > SLOW_SECONDS else None


# --------------------------------------------------------------------------- the seeded slice

def hostile_corpus(target: Target) -> list[bytes]:
    """Fixed inputs: every token alone, spliced into the middle of each seed, and the shapes
    that broke the parsers (deep nesting, huge integers, non-finite numbers)."""
    corpus = list(TOKENS) + list(target.hostile) + [b"[" * 5000, b'{"a":' * 3000, b"9" * 5000, b"a = " + b"[" * 3000,
                             b"a = " + b"9" * 5000, b'"' + b'a\\"' * 8000, b'["' + b'\\"' * 12000]
    for seed in target.seeds:
        middle = len(seed) // 2
        corpus += [seed[:middle] + token + seed[middle:] for token in TOKENS]
        corpus += [seed[:-1], seed + b"\x00", seed.replace(b"0.5", b"NaN"), seed.replace(b"0.5", b"1e999"),
                   seed.replace(b"300", b"9" * 5000), seed.replace(b"pi-7", b"pi-7\\n"),
                   seed.replace(b"2.5", b"Infinity"), seed.replace(b"8.0", b"inf")]
    return corpus


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four random edits: flip, insert a token, delete, duplicate, truncate, nest."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(buf))
        op = rng.randrange(6)
        if op == 0 and buf:
            buf[min(at, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[at:at] = rng.choice(TOKENS)
        elif op == 2:
            del buf[at:at + rng.randint(1, 64)]
        elif op == 3:
            buf[at:at] = buf[at:at + rng.randint(1, 64)]
        elif op == 4:
            del buf[at:]
        else:
            depth = rng.choice([33, 1200])
            buf[at:at] = rng.choice([b"[", b'{"a":']) * depth
    return bytes(buf[:MAX_INPUT_BYTES * 4])


def replay(target: Target, mutations: int = 300, seed: int = 0) -> list[tuple[bytes, Exception]]:
    """The seeds, the hostile corpus and `mutations` seeded mutations of them: the findings."""
    rng = random.Random(f"{target.name}/{seed}")
    inputs = list(target.seeds) + hostile_corpus(target)
    inputs += [mutate(rng.choice(inputs), rng) for _ in range(mutations)]
    return [(data, exc) for data in inputs if (exc := escaped(target, data)) is not None]


# --------------------------------------------------------------------------- coverage-guided runs

def run_slice(names: list[str], findings: Path) -> int:
    workdir = scratch_dir("slice")
    try:
        targets = build_targets(workdir)
        found = {name: replay(targets[name]) for name in names}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for name, escapes in found.items():
        for data, exc in escapes:
            save_finding(findings / name, data, exc)
        print(f"{name}: {len(escapes)} findings")
    return 1 if any(found.values()) else 0


def save_finding(folder: Path, data: bytes, exc: BaseException) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data).hexdigest()
    (folder / digest).write_bytes(data)
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    (folder / f"{digest}.txt").write_text(text)


def _escape(token: bytes) -> str:
    """A libFuzzer dictionary entry: every byte as \\xNN."""
    return "".join(f"\\x{byte:02x}" for byte in token)


def fuzz_worker(name: str, seconds: int, findings: Path, workdir: Path) -> None:
    """Run one target under libFuzzer until `seconds` pass; never returns (libFuzzer exits)."""
    import atheris

    with atheris.instrument_imports(include=INSTRUMENTED):
        target = build_targets(workdir)[name]
    corpus = workdir / "corpus"
    corpus.mkdir()
    for i, data in enumerate(target.seeds + tuple(hostile_corpus(target))):
        (corpus / f"seed-{i:04d}").write_bytes(data[:MAX_INPUT_BYTES])
    dictionary = workdir / "tokens.dict"
    dictionary.write_text("".join(f'"{_escape(token[:128])}"\n' for token in TOKENS))

    def one_input(data: bytes) -> None:
        exc = escaped(target, data)
        if exc is not None:
            save_finding(findings / name, data, exc)

    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", f"-max_len={MAX_INPUT_BYTES}",
                   f"-dict={dictionary}", "-print_final_stats=1", "-rss_limit_mb=3072",
                   "-timeout=30", str(corpus)], one_input)
    atheris.Fuzz()


@dataclass
class Row:
    target: str
    executions: int
    edges: int
    features: int
    findings: int  # inputs that made an undocumented exception escape
    distinct: int  # of those, distinct (exception type, raising line) pairs


def run_target(name: str, seconds: int, findings: Path) -> Row:
    shutil.rmtree(findings / name, ignore_errors=True)
    workdir = scratch_dir(name)
    try:
        done = subprocess.run([sys.executable, __file__, "--worker", name, "--seconds", str(seconds),
                               "--findings", str(findings), "--workdir", str(workdir)],
                              capture_output=True, text=True, timeout=seconds * 4 + 300)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    log = done.stdout + done.stderr
    executed = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log) or re.findall(r"Done (\d+) runs", log)
    coverage = re.findall(r"#\d+\s+\w+\s+cov: (\d+) ft: (\d+)", log)
    if not executed or not coverage:
        raise SystemExit(f"{name}: the fuzzing worker exited {done.returncode} without libFuzzer's "
                         f"statistics; its output ends:\n{log[-3000:]}")
    reports = sorted((findings / name).glob("*.txt")) if (findings / name).exists() else []
    edges, features = coverage[-1]
    return Row(name, int(executed[-1]), int(edges), int(features), len(reports),
               len({_signature(report.read_text()) for report in reports}))


def _signature(report: str) -> tuple[str, str]:
    """(exception type, the line that raised it) of a saved traceback."""
    frames = re.findall(r'File "([^"]+)", line (\d+)', report)
    kind = report.strip().splitlines()[-1].split(":")[0] if report.strip() else "?"
    return kind, ":".join(frames[-1]) if frames else "?"


def table(rows: list[Row], seconds: int) -> str:
    lines = [f"| target | executions ({seconds} s) | coverage (edges) | features | findings (distinct) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r.target} | {r.executions:,} | {r.edges:,} | {r.features:,} | {r.findings} ({r.distinct}) |"
              for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=30, help="fuzzing time per target")
    parser.add_argument("--target", action="append", choices=TARGET_NAMES,
                        help="fuzz only this target (repeatable); default: all")
    parser.add_argument("--findings", type=Path, default=Path("fuzz-findings"),
                        help="folder for inputs that made an undocumented exception escape")
    parser.add_argument("--slice", action="store_true", help="run the seeded slice (no atheris)")
    parser.add_argument("--worker", choices=TARGET_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        fuzz_worker(args.worker, args.seconds, args.findings, args.workdir)
        return 0
    names = args.target or TARGET_NAMES
    if args.slice:
        return run_slice(names, args.findings)
    rows = []
    for name in names:
        rows.append(run_target(name, args.seconds, args.findings))
        print(f"{name}: {rows[-1].executions:,} executions, {rows[-1].findings} findings", flush=True)
    print()
    print(table(rows, args.seconds))
    short = [r.target for r in rows if r.executions < MIN_EXECUTIONS]
    if short:
        print(f"\nunder {MIN_EXECUTIONS:,} executions: {', '.join(short)}; fuzz them for longer")
    if any(r.findings for r in rows):
        print(f"\nfindings are in {args.findings.resolve()}/<target>/ (input, and .txt: the traceback)")
    return 1 if short or any(r.findings for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
