"""Download throughput and hashing speed against the standard tools, measured in the same run.

- one large file over loopback (HTTP server in a separate process, bodies sent with ``sendfile``):
  ``fetch_file`` (download + MD5 while downloading + verification + rename) vs ``curl -o`` (transfer
  only; goal >= 0.9x) and vs ``curl -o && md5sum`` (what a user does to verify; goal >= 1x);
- MD5 of the same file from the page cache: ``driveengine.download.checksums.md5_file`` vs ``md5sum``
  (goal >= 0.9x);
- many small files with a simulated 20 ms round trip per request: ``--jobs 4`` vs ``--jobs 1``.

``BENCH_DOWNLOAD_MIB`` sets the large file's size (default 512).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from benchmarks.harness import best_time, report, section
from driveengine.download.checksums import md5_file
from driveengine.download.fetch import FetchOptions, FetchTask, fetch_file, fetch_many

SERVER = Path(__file__).resolve().parents[1] / "tests" / "download_server.py"


@contextmanager
def _server(directory: Path, latency_s: float = 0.0):
    """The loopback test server in its own process (so it does not share our GIL)."""
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), str(directory), str(latency_s)], stdout=subprocess.PIPE, text=True
    )
    try:
        url = proc.stdout.readline().strip()
        if not url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"test server did not start (got {url!r})")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _make_big(path: Path, mib: int) -> None:
    block = os.urandom(16 << 20)
    with open(path, "wb") as f:
        written = 0
        while written < mib << 20:
            n = min(len(block), (mib << 20) - written)
            f.write(block[:n])
            written += n


def main() -> None:
    mib = int(os.environ.get("BENCH_DOWNLOAD_MIB", "512"))
    with tempfile.TemporaryDirectory(prefix="bench_download_") as tmp:
        tmp = Path(tmp)
        srv = tmp / "srv"
        srv.mkdir()
        big = srv / "big.bin"
        _make_big(big, mib)
        expected = md5_file(big)
        out = tmp / "out"
        out.mkdir()

        section(f"download of one {mib} MiB file over 127.0.0.1")
        with _server(srv) as url:
            opts = FetchOptions(timeout_s=60.0)

            def ours() -> None:
                (out / "big.bin").unlink(missing_ok=True)
                res = fetch_file(
                    FetchTask(url=url + "big.bin", dest=out / "big.bin", name="big", md5=expected), opts
                )
                assert res.ok, res.error

            t_ours = best_time(ours, repeat=3)
            print(f"fetch_file (download + inline MD5 + verify + rename): {mib / t_ours:.0f} MiB/s")
            curl = shutil.which("curl")
            if curl is None:
                print("curl not found: skipping the curl comparison")
            else:
                target = out / "curl.bin"

                def run_curl() -> None:
                    subprocess.run([curl, "-s", "-f", "-o", str(target), url + "big.bin"], check=True)

                def run_curl_md5() -> None:
                    run_curl()
                    subprocess.run(["md5sum", str(target)], check=True, capture_output=True)

                t_curl = best_time(run_curl, repeat=3)
                report(
                    "throughput vs curl -o (transfer only)",
                    mib / t_ours,
                    mib / t_curl,
                    "MiB/s",
                    goal=">= 0.9",
                    higher_is_better=True,
                )
                if shutil.which("md5sum"):
                    t_both = best_time(run_curl_md5, repeat=3)
                    report(
                        "throughput vs curl -o && md5sum",
                        mib / t_ours,
                        mib / t_both,
                        "MiB/s",
                        goal=">= 1.0",
                        higher_is_better=True,
                    )

        section(f"MD5 of a {mib} MiB file (page cache)")
        t_md5 = best_time(lambda: md5_file(big), repeat=3)
        if shutil.which("md5sum"):
            t_sum = best_time(
                lambda: subprocess.run(["md5sum", str(big)], check=True, capture_output=True), repeat=3
            )
            report(
                "md5_file vs md5sum", mib / t_md5, mib / t_sum, "MiB/s", goal=">= 0.9", higher_is_better=True
            )
        else:
            print(f"md5sum not found; md5_file: {mib / t_md5:.0f} MiB/s")

        section("200 files of 256 KiB, 20 ms simulated round trip per request")
        small = tmp / "small"
        small.mkdir()
        payload = os.urandom(256 << 10)
        for i in range(200):
            (small / f"f{i:03d}.bin").write_bytes(payload)
        with _server(small, latency_s=0.02) as url:

            def many(jobs: int) -> float:
                dest = tmp / f"many{jobs}"
                shutil.rmtree(dest, ignore_errors=True)
                tasks = [
                    FetchTask(url=f"{url}f{i:03d}.bin", dest=dest / f"f{i:03d}.bin", name=str(i))
                    for i in range(200)
                ]
                start = time.perf_counter()
                results = fetch_many(tasks, FetchOptions(jobs=jobs))
                assert all(r.ok for r in results)
                return time.perf_counter() - start

            t1 = min(many(1) for _ in range(2))
            t4 = min(many(4) for _ in range(2))
            report("--jobs 4 vs --jobs 1 (wall time)", t4, t1, "s", goal="<= 0.35")


if __name__ == "__main__":
    main()
