"""Benchmark: bundle verification speed against plain hashlib, and memory vs bundle size.

Prints, in one run:

* ``verify_vs_sha256``: throughput of the agent's streaming verifier (``HashingWriter``:
  hash and length bound per chunk) divided by ``hashlib.sha256`` over the same file with
  the same chunk size. Goal >= 0.9: verification costs little beyond the hash itself.
* ``verified_write_vs_sha256``: the same verifier also writing each chunk to the partial
  download file, as the download does (the write is the download's cost, not the
  verifier's, but it is what a device pays).
* ``download_vs_sha256``: the whole device path over local HTTP (TUF refresh, streaming
  download + verify) against the same baseline, reported for honesty: it includes HTTP.
* ``rss_mb_<size>``: peak RSS of a fresh agent process that enrolls, refreshes, downloads,
  verifies and unpacks a bundle of that many MB. Goal: flat (within 10 MB) from 50 to 500.

The last line is one JSON object with the figures.

    python bench/verify.py                 # 50 MB and 500 MB bundles
    python bench/verify.py --sizes 2,8     # a quick run
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHUNK = 1024 * 1024


def _write_random(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        left = size
        while left:
            block = os.urandom(min(CHUNK, left))
            digest.update(block)
            out.write(block)
            left -= len(block)
    return digest.hexdigest()


def make_bundle(work: Path, megabytes: int) -> Path:
    """A bundle whose model is ``megabytes`` of random bytes (unpacked, never loaded)."""
    from agent.contract import BundleManifest, FileEntry, TensorSchema, to_json, utcnow

    model = work / f"model-{megabytes}.bin"
    sha = _write_random(model, megabytes * 1024 * 1024)
    manifest = to_json(BundleManifest(
        name=f"big{megabytes}", version=1, runtime="onnx", model_file="model.onnx",
        inputs=[TensorSchema(name="x", dtype="float32", shape=[None, 4])],
        outputs=[TensorSchema(name="y", dtype="float32", shape=[None, 1])],
        files={"model.onnx": FileEntry(sha256=sha, size=model.stat().st_size)},
        created=utcnow(),
    ))
    path = work / f"big{megabytes}-1.bundle"
    with tarfile.open(path, "w:") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, fileobj=io.BytesIO(manifest))
        info = tarfile.TarInfo("model.onnx")
        info.size = model.stat().st_size
        with open(model, "rb") as data:
            tar.addfile(info, fileobj=data)
    model.unlink()
    return path


def best_of(runs: int, action) -> float:
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        timings.append(time.perf_counter() - started)
    return min(timings)


def plain_sha256(path: Path) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        while chunk := data.read(CHUNK):
            digest.update(chunk)
    digest.hexdigest()


def streaming_verify(path: Path) -> None:
    """The verifier alone: chunk-wise hash and length bound, bytes going nowhere."""
    from agent.trust.client import HashingWriter

    writer = HashingWriter(Path(os.devnull), path.stat().st_size)
    with open(path, "rb") as source, open(os.devnull, "wb") as sink:
        while chunk := source.read(CHUNK):
            writer.append(sink, chunk)
    writer.digest.hexdigest()


def verifying_copy(path: Path, part: Path) -> None:
    """The verifier as the download runs it: also writing each chunk to the partial file."""
    from agent.trust.client import HashingWriter

    part.unlink(missing_ok=True)
    writer = HashingWriter(part, path.stat().st_size)
    writer.resync()
    with open(path, "rb") as source, writer.open() as out:
        while chunk := source.read(CHUNK):
            writer.append(out, chunk)
    writer.digest.hexdigest()


def serve(data_dir: Path):
    import uvicorn

    from fleet.api import create_app
    from fleet.db import init_db, make_engine
    from fleet.local_broker import free_port
    from fleet.trust.repository import FleetRepository

    repository = FleetRepository(data_dir)
    engine = make_engine(f"sqlite:///{data_dir / 'fleet.db'}")
    init_db(engine)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, None, repository),
                                           host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{port}"


def client_run(url: str, target: str, state_dir: Path) -> None:
    """In a fresh process: the device path, then this process's peak RSS."""
    from agent.bundle import extract_bundle
    from agent.trust.client import BundleClient, enroll

    enroll(url, state_dir / "tuf")
    client = BundleClient(url, state_dir, max_bundle_bytes=1 << 40)
    started = time.perf_counter()
    client.refresh()
    path = client.download(client.target_info(target))
    seconds = time.perf_counter() - started
    extract_bundle(path, state_dir / "slot", max_bytes=1 << 40)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "bytes": path.stat().st_size,
                      "rss_mb": round(peak_kb / 1024, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50,500", help="bundle sizes in MB, comma-separated")
    parser.add_argument("--client", nargs=3, metavar=("URL", "TARGET", "STATE_DIR"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_run(args.client[0], args.client[1], Path(args.client[2]))
        return

    from fleet.trust.repository import FleetRepository

    sizes = [int(s) for s in args.sizes.split(",")]
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        work = Path(tmp)
        repository = FleetRepository(work / "fleet")
        repository.init()
        bundles = {}
        for size in sizes:
            print(f"building a {size} MB bundle ...", flush=True)
            bundles[size] = make_bundle(work, size)
            repository.publish(bundles[size], bundles[size].name)

        largest = bundles[max(sizes)]
        megabytes = largest.stat().st_size / 1e6
        plain = best_of(3, lambda: plain_sha256(largest))
        verify = best_of(3, lambda: streaming_verify(largest))
        copy = best_of(3, lambda: verifying_copy(largest, work / "copy.part"))
        (work / "copy.part").unlink(missing_ok=True)
        print(f"sha256 alone:              {megabytes / plain:8.1f} MB/s")
        print(f"streaming verification:    {megabytes / verify:8.1f} MB/s")
        print(f"verification + disk write: {megabytes / copy:8.1f} MB/s")
        figures["verify_vs_sha256"] = round(plain / verify, 3)
        figures["verified_write_vs_sha256"] = round(plain / copy, 3)
        figures["sha256_mb_s"] = round(megabytes / plain, 1)

        server, url = serve(work / "fleet")
        try:
            for size, bundle in bundles.items():
                done = subprocess.run(
                    [sys.executable, __file__, "--client", url, bundle.name,
                     str(work / f"device-{size}")],
                    capture_output=True, text=True, check=True,
                )
                result = json.loads(done.stdout.strip().splitlines()[-1])
                rate = result["bytes"] / 1e6 / result["seconds"]
                print(f"{size:4d} MB bundle: download+verify {rate:8.1f} MB/s, "
                      f"peak RSS {result['rss_mb']} MB")
                figures[f"rss_mb_{size}"] = result["rss_mb"]
                if bundle is largest:
                    figures["download_vs_sha256"] = round(rate / (megabytes / plain), 3)
        finally:
            server.should_exit = True
    rss = [figures[f"rss_mb_{s}"] for s in sizes]
    figures["rss_growth_mb"] = round(max(rss) - min(rss), 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
