"""A loopback (127.0.0.1) HTTP file server with Range support and fault injection.

Used by the download tests and ``benchmarks/bench_download.py``. It serves a directory; bodies go out
with ``sendfile`` so the server is not the bottleneck of a throughput measurement. Faults are queued
per path and each is consumed by one request:

- ``"drop:N"``: announce the full length, send ``N`` body bytes, then close the connection;
- ``"500"`` / ``"503"``: that status with ``Retry-After: 0``;
- ``"ignore-range"``: answer ``200`` with the whole file even to a ``Range`` request;
- ``"wrong-bytes"``: the right length, every byte inverted;
- ``"slow"``: the body in 32 KiB pieces 20 ms apart (about 1.6 MB/s);
- ``"trickle"`` / ``"trickle:S"``: the full length announced, then one body byte every 2 s (every ``S``
  seconds), until the body is sent or the client has gone;
- ``"404"``: not found.

Size probes (``Range: bytes=0-0``) do not consume faults, so a fault hits the transfer it is meant for.
Every request is recorded in :attr:`FileServer.requests` as ``(path, Range header or None)`` and its
``Authorization`` header in :attr:`FileServer.authorizations`. ``bearer`` makes the server answer 401 to
requests without ``Authorization: Bearer <bearer>``; ``redirect_to`` answers every (authorised) request
with a 302 to ``redirect_to`` + the path, as the Hugging Face mirror redirects to its CDN.
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

    def __init__(
        self,
        directory: str | Path,
        latency_s: float = 0.0,
        bearer: str | None = None,
        redirect_to: str | None = None,
    ) -> None:
        self.directory = Path(directory).resolve()
        self.latency_s = latency_s  # added before each response: a simulated round trip
        self.bearer = bearer
        self.redirect_to = redirect_to
        self.requests: list[tuple[str, str | None]] = []
        self.authorizations: list[str | None] = []
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
        authorization = h.headers.get("Authorization")
        with self._lock:
            self.requests.append((rel, range_header))
            self.authorizations.append(authorization)
            probe = (range_header or "").replace(" ", "") == "bytes=0-0"
            fault = self._faults[rel].popleft() if self._faults[rel] and not probe else None
        if self.latency_s:
            time.sleep(self.latency_s)
        if self.bearer is not None and authorization != f"Bearer {self.bearer}":
            self._simple(h, 401)
            return
        if self.redirect_to is not None:
            self._simple(h, 302, {"Location": self.redirect_to + rel})
            return
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
                elif fault is not None and fault.startswith("trickle"):
                    interval = float(fault.split(":", 1)[1]) if ":" in fault else 2.0
                    f.seek(start)
                    while byte := f.read(1) if f.tell() <= end else b"":
                        h.wfile.write(byte)
                        h.wfile.flush()
                        time.sleep(interval)
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

    The release manifest of this synthetic release is written to ``base / "release.json"`` (pass it with
    ``--release-json``): the packaged one with the metadata archive's exact size (the packaged rounded
    size describes the real archive, which a synthetic one is not).

    Returns:
        ``{"server": folder to serve, "logs": [log names], "blobs": {log: [paths relative to
        sensor_blobs/<split>]}, "release_json": the manifest}``
    """
    import pickle

    from driveengine.collect.runner import CollectConfig, collect
    from driveengine.export.openscene import export_openscene_metadata
    from driveengine.synth import synthesize

    world_dir = base / "world"
    synth = synthesize(world_dir, logs=logs, seconds=1.0, points=300, image_size=(32, 18))
    summary = collect(
        CollectConfig.from_options(
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
    metadata = server / f"openscene-v1.1/openscene_metadata_{split}.tgz"
    add_tar(metadata, tree, [f"openscene-v1.1/meta_datas/{split}/{n}.pkl" for n in names])
    release_json = write_release_json(base / "release.json", split, {"metadata": metadata.stat().st_size})
    return {"server": server, "logs": names, "blobs": blobs, "release_json": release_json}


def write_release_json(path: Path, split: str, sizes: dict[str, int | None], size_exact: bool = True) -> Path:
    """Write a copy of the packaged release manifest where ``split``'s modalities have ``sizes`` (bytes,
    ``size_exact`` as given; ``None``: unknown); returns ``path``."""
    import json

    from driveengine.download.release import load_manifest

    manifest = json.loads(json.dumps(load_manifest()))
    modalities = manifest["splits"][split]["modalities"]
    for modality, size in sizes.items():
        modalities[modality]["size"] = size
        modalities[modality]["size_exact"] = size_exact
    path.write_text(json.dumps(manifest, indent=1))
    return path


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


# -- hostile archives ---------------------------------------------------------------------------------


def symlink_chain_escape_tar(archive: Path, dest: Path, levels_up: int) -> None:
    """Write the CVE-2025-4517 archive (CPython gh-135034, ``test_realpath_limit_attack``) for extraction
    into ``dest``.

    Sixteen folders with names long enough that their expanded path overflows ``PATH_MAX``, each
    reached through a one-letter symlink (``a`` -> ``ddd...``); a final symlink under ``a/b/.../p`` points
    sixteen levels up (back to ``dest``), but ``os.path.realpath`` gives up on it (name too long) and
    so tarfile's ``data`` filter (before 3.11.13) believes every path through it stays inside. Then
    ``escape`` -> that link followed by ``levels_up`` x ``..``; ``flaglink``, a hard link to
    ``escape/flag``, is overwritten with ``overwrite`` (changing the file ``flag`` ``levels_up`` folders
    above ``dest``), and ``escape/newfile`` creates ``newfile`` there.
    """
    import io
    import tarfile

    steps = "abcdefghijklmnop"
    path_max = os.pathconf(dest.anchor, "PC_PATH_MAX")
    component = "d" * ((path_max - len(str(dest)) - 1) // (len(steps) + 1))

    def add(tar: tarfile.TarFile, name: str, kind: bytes, link: str = "", data: bytes | None = None) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = link
        info.mode = 0o777 if kind == tarfile.DIRTYPE else 0o644
        if data is None:
            tar.addfile(info)
        else:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        path = ""
        for step in steps:
            add(tar, os.path.join(path, component), tarfile.DIRTYPE)
            add(tar, os.path.join(path, step), tarfile.SYMTYPE, component)
            path = os.path.join(path, component)
        long_link = os.path.join(*steps, "l" * 254)
        add(tar, long_link, tarfile.SYMTYPE, os.path.join(*[".."] * len(steps)))
        add(tar, "escape", tarfile.SYMTYPE, long_link + "/.." * levels_up)
        add(tar, "flaglink", tarfile.LNKTYPE, "escape/flag")
        add(tar, "flaglink", tarfile.REGTYPE, data=b"overwrite")
        add(tar, "escape/newfile", tarfile.REGTYPE, data=b"new")
