"""Run a source reader on a hostile file in a child process that cannot take the machine down.

The child imports the reader and warms it up (imports, the compiled pickle scan), then limits its address
space to what it uses plus 1 GiB (``RLIMIT_AS``) and reads the file; the parent bounds its wall time.
It reports the exception it got (type, message) and its peak resident memory as one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

#: A bound on a runaway child (not a timing assertion).
CHILD_TIMEOUT_S = 120
#: Address space the read may add to the warmed-up child.
EXTRA_ADDRESS_SPACE = 1 << 30

_CHILD = r"""
import json, resource, sys
from driveengine.sources.nuplan.reader import read_nuplan_log
from driveengine.sources.openscene.reader import read_openscene_log
from driveengine.sources.safe_pickle import restricted_loads
restricted_loads(b"\x80\x04K\x01.", {}, "warm-up")
used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
limit = used + int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
reader = {"nuplan": read_nuplan_log, "openscene": read_openscene_log}[sys.argv[1]]
try:
    reader(sys.argv[2])
    report = {"error": None, "message": ""}
except BaseException as exc:
    report = {"error": type(exc).__name__, "message": str(exc)}
# VmHWM is this process's own peak (ru_maxrss would start from the parent's peak at fork: the pytest
# process of a whole suite run is past 1 GiB)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
report["peak_rss_mib"] = int(hwm.split()[1]) / 1024
print(json.dumps(report))
"""


def read_in_child(reader: str, path: Path) -> dict:
    """Read ``path`` with ``reader`` ("nuplan" or "openscene") in a bounded child; its JSON report."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, reader, str(path), str(EXTRA_ADDRESS_SPACE)],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {path.name} ran past {CHILD_TIMEOUT_S} s: the bomb went off")
    assert proc.returncode == 0, f"the child died (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])
