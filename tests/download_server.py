"""A loopback (127.0.0.1) HTTP file server with Range support and fault injection.

Used by the download tests and ``benchmarks/bench_download.py``. It serves a directory; bodies go out
with ``sendfile`` so the server is not the bottleneck of a throughput measurement. Faults are queued
per path and each is consumed by one request:

- ``"drop:N"``: announce the full length, send ``N`` body bytes, then close the connection;
- ``"500"`` / ``"503"``: that status with ``Retry-After: 0``;
- ``"ignore-range"``: answer ``200`` with the whole file even to a ``Range`` request;
- ``"wrong-bytes"``: the right length, every byte inverted;
- ``"slow"``: the body in 32 KiB pieces 20 ms apart (about 1.6 MB/s);
- ``"404"``: not found.

Size probes (``Range: bytes=0-0``) do not consume faults, so a fault hits the transfer it is meant for.
Every request is recorded in :attr:`FileServer.requests` as ``(path, Range header or None)``.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections import defaultdict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_INVERT = bytes(range(255, -1, -1))


class FileServer:
    """Serve ``directory`` on ``http://127.0.0.1:<port>/`` in a background thread (a context manager)."""

    def __init__(self, directory: str | Path, latency_s: float = 0.0) -> None:
        self.directory = Path(directory).resolve()
        self.latency_s = latency_s  # added before each response: a simulated round trip
        self.requests: list[tuple[str, str | None]] = []
        self._faults: dict[str, deque[str]] = defaultdict(deque)
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def add_faults(self, path: str, *faults: str) -> None:
        """Queue ``faults`` for requests of ``path`` (release-relative, no leading ``/``)."""
        with self._lock:
            self._faults[path.lstrip("/")].extend(faults)

    def ranges(self, path: str, probes: bool = False) -> list[str | None]:
        """The Range headers received for ``path``, in order (``None``: no Range header); size probes
        (``bytes=0-0``) only when ``probes``."""
        return [r for p, r in self.requests if p == path.lstrip("/") and (probes or r != "bytes=0-0")]

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        rel = unquote(urlsplit(h.path).path).lstrip("/")
        range_header = h.headers.get("Range")
        with self._lock:
            self.requests.append((rel, range_header))
            probe = (range_header or "").replace(" ", "") == "bytes=0-0"
            fault = self._faults[rel].popleft() if self._faults[rel] and not probe else None
        if self.latency_s:
            time.sleep(self.latency_s)
        file = (self.directory / rel).resolve()
        if fault == "404" or not file.is_file() or self.directory not in file.parents:
            self._simple(h, 404)
            return
        if fault in ("500", "503"):
            self._simple(h, int(fault), {"Retry-After": "0"})
            return
        size = file.stat().st_size
        start, end = 0, size - 1
        status = 200
        if range_header and fault != "ignore-range":
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip())
            if not match or int(match.group(1)) >= size:
                self._simple(h, 416, {"Content-Range": f"bytes */{size}"})
                return
            start = int(match.group(1))
            end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            status = 206
        length = end - start + 1
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(length))
        h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        h.end_headers()
        h.wfile.flush()
        if fault is not None and fault.startswith("drop:"):
            length = min(length, int(fault.split(":", 1)[1]))
        try:
            with open(file, "rb") as f:
                if fault == "wrong-bytes":
                    f.seek(start)
                    h.wfile.write(f.read(length).translate(_INVERT))
                    h.wfile.flush()
                elif fault == "slow":
                    f.seek(start)
                    while chunk := f.read(min(32 << 10, end + 1 - f.tell())):
                        h.wfile.write(chunk)
                        h.wfile.flush()
                        time.sleep(0.02)
                else:
                    sock = h.connection
                    offset, remaining = start, length
                    while remaining > 0:
                        sent = os.sendfile(sock.fileno(), f.fileno(), offset, min(remaining, 1 << 24))
                        if sent == 0:
                            break
                        offset += sent
                        remaining -= sent
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True
            return
        if fault is not None and fault.startswith("drop:"):
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @staticmethod
    def _simple(h: BaseHTTPRequestHandler, status: int, headers: dict[str, str] | None = None) -> None:
        body = f"{status}\n".encode()
        h.send_response(status)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)


# -- a synthetic OpenScene-layout release ------------------------------------------------------------


def add_tar(archive: Path, root: Path, members: list[str]) -> None:
    """Write ``archive`` (gzip tar) holding ``members`` (paths relative to ``root``)."""
    import tarfile

    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for rel in members:
            tar.add(root / rel, arcname=rel, recursive=False)


def make_release(base: Path, logs: int = 2, split: str = "mini") -> dict[str, object]:
    """Build a small OpenScene v1.1 release under ``base / "server"`` from the synthetic nuPlan world.

    The metadata pickles are the project's own OpenScene export of the collected synthetic logs
    (``collect`` then ``store.legacy.export_openscene_metadata``); the blobs are the ones they reference.
    Log ``i`` goes to lidar shard ``i`` and camera shard ``i``; the metadata archive holds every pickle.

    Returns:
        ``{"server": folder to serve, "logs": [log names], "blobs": {log: [paths relative to sensor_blobs/<split>]}}``
    """
    import pickle

    from driveengine.collect.runner import CollectConfig, collect
    from driveengine.store.legacy import export_openscene_metadata
    from driveengine.synth import synthesize

    world_dir = base / "world"
    synth = synthesize(world_dir, logs=logs, seconds=1.0, points=300, image_size=(32, 18))
    summary = collect(
        CollectConfig(
            source="nuplan", root=world_dir, out=base / "collected", split=split, labels=False, progress=False
        ),
        echo=lambda _: None,
    )
    assert summary.ok and summary.frames > 0, summary
    tree = base / "tree"  # the extracted layout, packed into archives below
    release = tree / "openscene-v1.1"
    pickles = export_openscene_metadata(base / "collected" / split, release / "meta_datas" / split)
    sensor_root = synth[0].sensor_root
    server = base / "server"
    blobs: dict[str, list[str]] = {}
    names = [p.stem for p in pickles]
    for i, pkl in enumerate(pickles):
        frames = pickle.loads(pkl.read_bytes())
        files = {f["lidar_path"] for f in frames} | {
            c["data_path"] for f in frames for c in f["cams"].values()
        }
        blobs[pkl.stem] = sorted(files)
        for rel in files:
            dst = release / "sensor_blobs" / split / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(sensor_root / rel, dst)
        prefix = f"openscene-v1.1/sensor_blobs/{split}/"
        for modality, suffix in (("lidar", ".pcd"), ("camera", ".jpg")):
            add_tar(
                server
                / f"openscene-v1.1/openscene_sensor_{split}_{modality}/openscene_sensor_{split}_{modality}_{i}.tgz",
                tree,
                [prefix + p for p in blobs[pkl.stem] if p.endswith(suffix)],
            )
    add_tar(
        server / f"openscene-v1.1/openscene_metadata_{split}.tgz",
        tree,
        [f"openscene-v1.1/meta_datas/{split}/{n}.pkl" for n in names],
    )
    return {"server": server, "logs": names, "blobs": blobs}


def cached_release(tmp_path_factory: object) -> dict[str, object]:
    """:func:`make_release` once per pytest session (shared by the download and verify tests)."""
    import pickle

    base = tmp_path_factory.getbasetemp() / "openscene_release"  # type: ignore[attr-defined]
    info = base / "info.pkl"
    if not info.exists():
        base.mkdir(exist_ok=True)
        info.write_bytes(pickle.dumps(make_release(base)))
    return pickle.loads(info.read_bytes())


if __name__ == "__main__":
    # python tests/download_server.py DIR [LATENCY_S]: serve DIR, print the URL, run until killed
    import sys

    with FileServer(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.0) as _server:
        print(_server.url, flush=True)
        threading.Event().wait()
