"""Run under ``torchrun`` by tests/test_ddp.py: stream a split on every rank and record what each rank saw.

Usage: ``torchrun --nproc_per_node N tests/ddp_stream_script.py ROOT SPLIT OUT_DIR NUM_WORKERS GLOBAL_BATCH
[PRETRAIN_STEPS]``. Writes ``OUT_DIR/rank<r>.json``: ``{"epochs": {epoch: [[tokens of batch], ...]},
"filtered": {...the same over FILTER...}}``, and with PRETRAIN_STEPS > 0 runs that many DDP pre-training
steps (gloo) and adds ``"pretrain"`` (losses).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.compute as pc
import torch
import torch.distributed as dist

from driveengine.data import FrameStream


def filter_kwargs() -> dict:
    """The filter the script also streams with: two of the fixture's map locations, no scene start."""
    return {"map_locations": ["las_vegas", "pittsburgh"], "where": pc.field("frame_idx") >= 1}


def record(root: str, split: str, num_workers: int, global_batch: int, epochs=(0, 1), **kw) -> dict:
    """Tokens per batch per epoch seen by this process (rank from torch.distributed when initialised)."""
    stream = FrameStream(
        root, split, fields=("token", "semantics"), seed=3, global_batch_size=global_batch, **kw
    )
    out = {}
    for epoch in epochs:
        stream.set_epoch(epoch)
        out[str(epoch)] = [batch["token"] for batch in stream.loader(num_workers=num_workers)]
    return out


def main() -> None:
    root, split, out_dir, num_workers, global_batch = sys.argv[1:6]
    steps = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {
        "epochs": record(root, split, int(num_workers), int(global_batch)),
        "filtered": record(root, split, int(num_workers), int(global_batch), **filter_kwargs()),
        "world_size": dist.get_world_size(),
    }
    if steps:
        from driveengine.train.config import PretrainConfig
        from driveengine.train.loop import pretrain

        summary = pretrain(
            PretrainConfig(
                data=root, split=split, width=8, decoder_channels=16, stem_stride=1, output_stride=1, batch_size=2, max_steps=steps,
                run_dir=str(Path(out_dir) / "runs"), progress=False, eval_every=steps, eval_frames=0,
                ckpt_every=steps, cpu_threads=1, class_weight_frames=4,
            )
        )  # fmt: skip
        result["pretrain"] = {"losses": summary["train_loss"], "world_size": summary["world_size"],
                              "eval_frames": summary["eval"]["frames"]}  # fmt: skip
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
