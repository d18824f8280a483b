"""FrameStream and pre-training under ``torchrun`` (2 CPU processes, gloo, 2 DataLoader workers each)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from ddp_stream_script import filter_kwargs, record
from stream_fixtures import build_split

SCRIPT = Path(__file__).with_name("ddp_stream_script.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, args: list[str], timeout: float = 240) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(SCRIPT), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_two_ranks_two_workers_see_each_frame_once_in_the_global_order(tmp_path):
    info = build_split(tmp_path / "data", scenes_per_log=((5, 3), (6,), (2, 4)), points=True, structured=True)
    # 20 frames, global batch 4: 5 steps, no padding, so every frame exactly once per epoch.
    out = tmp_path / "ddp"
    out.mkdir()
    _torchrun(2, [str(info.root), info.split, str(out), "2", "4", "2"])
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]

    reference = record(str(info.root), info.split, num_workers=0, global_batch=4, rank=0, world_size=1)
    also_1x2 = record(str(info.root), info.split, num_workers=2, global_batch=4, rank=0, world_size=1)
    assert also_1x2 == reference
    for epoch in ("0", "1"):
        per_rank = [r["epochs"][epoch] for r in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == 5  # equal step counts: no DDP hang
        seen = [t for r in per_rank for batch in r for t in batch]
        assert sorted(seen) == sorted(info.frames)  # together: every frame exactly once
        tokens = [{t for batch in r for t in batch} for r in per_rank]
        assert not tokens[0] & tokens[1]
        global_batches = [a + b for a, b in zip(per_rank[0], per_rank[1], strict=True)]
        assert global_batches == reference[epoch]  # the same global order as 1 rank x 1 worker
    assert ranks[0]["epochs"]["0"] != ranks[0]["epochs"]["1"]  # epochs differ

    # A filtered stream: the same global batches over 2 ranks x 2 workers as 1 rank x 1 worker, over the subset.
    subset = [t for t, f in info.frames.items() if f.map_location in ("las_vegas", "pittsburgh") and f.row > 0
              and info.frames[t].scene == next(g.scene for g in info.frames.values() if g.log == f.log
                                               and g.row == f.row - 1)]  # fmt: skip
    assert 0 < len(subset) < len(info.frames)
    reference = record(str(info.root), info.split, 0, 4, rank=0, world_size=1, **filter_kwargs())
    for epoch in ("0", "1"):
        per_rank = [r["filtered"][epoch] for r in ranks]
        assert len(per_rank[0]) == len(per_rank[1])
        global_batches = [a + b for a, b in zip(per_rank[0], per_rank[1], strict=True)]
        assert global_batches == reference[epoch]
        assert set(t for batch in global_batches for t in batch) == set(subset)

    # DDP pre-training ran on both ranks with the same (all-reduced) losses, evaluated all frames.
    runs = [r["pretrain"] for r in ranks]
    assert runs[0]["world_size"] == 2 and len(runs[0]["losses"]) == 2
    assert runs[0]["losses"] == runs[1]["losses"]
    assert runs[0]["eval_frames"] == 20
    assert (out / "runs" / "pretrain" / "metrics.csv").exists()
