"""Child processes of tests/test_remote_cache.py (spawned: this module imports only the cache, so they
start in a fraction of a second)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from driveengine.store.cache import CachingFileSystem, Version, register_versions


def read_everything(cache_dir: str, limit: int, options: dict, urls: list[str], out: str) -> None:
    """Read every URL twice, in a random order, through a shared cache folder; write what was read
    (sha256 per URL)."""
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    register_versions(cache_dir, limit, {url: Version("v1") for url in urls})
    fs = CachingFileSystem(
        target_protocol="s3", target_options=options, cache_dir=cache_dir, cache_limit_bytes=limit
    )
    digests = {}
    rng = np.random.default_rng(os.getpid())
    for _ in range(2):
        for url in rng.permutation(urls).tolist():
            digests[url] = hashlib.sha256(fs.cat_file(url)).hexdigest()
    Path(out).write_text(json.dumps(digests))


def read_on_a_small_disk(cache_dir: str, options: dict, url: str, out: str) -> None:
    """Read one URL through the cache with a 4 KiB file size limit: the local write fails (EFBIG)."""
    import resource
    import signal

    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    register_versions(cache_dir, 10**9, {url: Version("v1")})
    fs = CachingFileSystem(
        target_protocol="s3", target_options=options, cache_dir=cache_dir, cache_limit_bytes=10**9
    )
    data = fs.cat_file(url)
    stats = fs.cache.stats()
    Path(out).write_text(json.dumps({"sha": hashlib.sha256(data).hexdigest(), "bypassed": stats.bypassed}))
