"""Split definitions as data files (installed as ``driveengine.splits``).

A split says which input folder to read and, optionally, which logs and key frames of it to keep:

* **folder splits** (``mini``, ``trainval``, ``test``): every log of ``<nuplan>/splits/<folder>/`` or
  ``<openscene>/meta_datas/<folder>/``;
* **log-list splits**: nuPlan's own train/val/test log lists (``nuplan_train``, ``nuplan_val``,
  ``nuplan_test``, from nuplan-devkit's splitter config);
* **log + token splits**: NAVSIM's ``navtrain``, ``navtest``, ``navmini`` (log names and key-frame
  tokens, from NAVSIM's scene filters);
* **nuScenes scene splits** (``dataset: nuscenes``): the devkit's official scene lists
  (``nuscenes_mini_train``, ``nuscenes_mini_val``, ``nuscenes_train``, ``nuscenes_val``, ``nuscenes_test``,
  ``nuscenes_train_detect``, ``nuscenes_train_track``); a nuScenes log is a scene, ``folder`` the table
  folder (``v1.0-mini``, ``v1.0-trainval``, ``v1.0-test``);
* **user splits**: any YAML file passed as ``--split path/to/my_split.yaml``.

YAML keys (all optional except ``folder``, which may also be given as NAVSIM's ``openscene_split``)::

    name: my_split                  # default: the file name without .yaml
    description: what it is for
    provenance: where the lists come from
    dataset: nuplan                 # whose logs these are (default nuplan; nuscenes for its scenes)
    folder: trainval                # input folder: splits/<folder>/ (nuPlan) or meta_datas/<folder>/
    log_names: [log_a, log_b]       # or, compact: {"<date>_<vehicle>": "<seg> <seg> ..."} where
                                    #   each log name is "<date>_<vehicle>_<seg>"
    tokens: [16hex, ...]            # or one whitespace-separated string; keep only these key frames
                                    #   (nuPlan lidar_pc tokens, 16 hex; nuScenes sample tokens, 32 hex)

Key frames are the lidar_pc tokens OpenScene's metadata uses, so NAVSIM's tokens select the same frames.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from driveengine.errors import DriveEngineError


class SplitError(DriveEngineError):
    """A split name is unknown or a split file is malformed."""


@dataclass(frozen=True)
class SplitDef:
    """One split.

    Attributes:
        name: the split's name (output goes to ``<out>/<name>/``).
        dataset: the dataset whose logs the split names (a source's ``dataset``: ``nuplan`` for nuPlan
            and OpenScene inputs, ``nuscenes``, ...).
        folder: input folder name: ``<nuplan>/splits/<folder>/`` or ``<openscene>/meta_datas/<folder>/``.
        log_names: logs to keep, or None for every log of the folder.
        tokens: key-frame (``lidar_pc``) tokens to keep, or None for every key frame.
        description: one line for ``driveengine splits``.
        provenance: where the lists come from.
        path: the YAML file it was read from.
    """

    name: str
    folder: str
    dataset: str = "nuplan"
    log_names: frozenset[str] | None = None
    tokens: frozenset[str] | None = None
    description: str = ""
    provenance: str = ""
    path: str | None = None

    def select_logs(self, available: list[str]) -> list[str]:
        """The names of ``available`` that this split keeps, sorted."""
        if self.log_names is None:
            return sorted(available)
        return sorted(set(available) & self.log_names)

    def tokens_digest(self) -> str | None:
        """A short hash of the token list (part of the collect config hash), None without tokens."""
        if self.tokens is None:
            return None
        return hashlib.sha256("\n".join(sorted(self.tokens)).encode()).hexdigest()[:16]


def _package_dir() -> Path:
    return Path(str(resources.files(__name__)))


def _parse_log_names(value: Any, path: str) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, dict):
        names = set()
        for drive, segments in value.items():
            if not isinstance(segments, str):
                raise SplitError(f"{path}: log_names[{drive!r}] must be a string of segment names")
            names.update(f"{drive}_{seg}" for seg in segments.split())
        return frozenset(names)
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        return frozenset(value)
    raise SplitError(f"{path}: log_names must be a list of log names or a mapping drive -> segments")


#: Length (hex characters) of a key-frame token, per dataset: nuPlan's ``lidar_pc`` tokens are 8 bytes,
#: nuScenes' sample tokens 16 bytes. Other datasets' tokens may be any even length of 8 to 64.
TOKEN_HEX_CHARS: dict[str, int] = {"nuplan": 16, "nuscenes": 32}


def _parse_tokens(value: Any, path: str, dataset: str = "nuplan") -> frozenset[str] | None:
    if value is None:
        return None
    width = TOKEN_HEX_CHARS.get(dataset)
    what = f"{width}-hex" if width else "hex"
    tokens = value.split() if isinstance(value, str) else value
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise SplitError(f"{path}: tokens must be a list of {what} tokens or one whitespace-separated string")
    bad = [
        t
        for t in tokens
        if (len(t) != width if width else not (8 <= len(t) <= 64 and len(t) % 2 == 0))
        or any(ch not in "0123456789abcdef" for ch in t)
    ]
    if bad:
        raise SplitError(
            f"{path}: {dataset} tokens must be {width or 'an even number (8-64) of'} lowercase hex characters; "
            f"e.g. {bad[0]!r} is not"
        )
    return frozenset(tokens)


def split_from_dict(data: dict[str, Any], path: str, default_name: str) -> SplitDef:
    """A :class:`SplitDef` from the YAML mapping of a split file (see the module doc for the keys)."""
    if not isinstance(data, dict):
        raise SplitError(f"{path}: a split file must be a YAML mapping with folder / log_names / tokens")
    folder = data.get("folder", data.get("openscene_split"))
    if not isinstance(folder, str) or not folder:
        raise SplitError(
            f"{path}: no input folder; add `folder: mini|trainval|test` (the folder under splits/ or meta_datas/)"
        )
    dataset = data.get("dataset", "nuplan")
    if not isinstance(dataset, str) or not dataset:
        raise SplitError(
            f"{path}: dataset must be a dataset name such as nuplan or nuscenes, got {dataset!r}"
        )
    return SplitDef(
        name=str(data.get("name", default_name)),
        folder=folder,
        dataset=dataset,
        log_names=_parse_log_names(data.get("log_names"), path),
        tokens=_parse_tokens(data.get("tokens"), path, dataset),
        description=str(data.get("description", "")),
        provenance=str(data.get("provenance", data.get("source", ""))),
        path=path,
    )


#: libyaml's safe loader where available (parses navtrain's 100k tokens ~40x faster), else PyYAML's.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@lru_cache(maxsize=32)
def _load_file(path: str) -> SplitDef:
    try:
        data = yaml.load(Path(path).read_text(), Loader=_SafeLoader)
    except FileNotFoundError:
        raise SplitError(f"{path}: no such split file") from None
    except (OSError, yaml.YAMLError) as exc:
        raise SplitError(f"{path}: unreadable split file ({exc})") from None
    return split_from_dict(data, path, Path(path).name.removesuffix(".yaml").removesuffix(".yml"))


def list_splits() -> list[SplitDef]:
    """The splits shipped with DriveEngine, sorted by name."""
    return sorted((_load_file(str(p)) for p in _package_dir().glob("*.yaml")), key=lambda s: s.name)


def load_split(name_or_path: str | os.PathLike[str]) -> SplitDef:
    """A shipped split by name (``mini``, ``navtrain``, ...) or a user split file by path.

    Raises:
        SplitError: unknown name (the message lists the known ones) or malformed file.
    """
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or os.sep in text or Path(text).is_file():
        return _load_file(str(Path(text).resolve()))
    shipped = _package_dir() / f"{text}.yaml"
    if shipped.is_file():
        return _load_file(str(shipped))
    known = ", ".join(s.name for s in list_splits())
    raise SplitError(f"unknown split {text!r}; known splits: {known}; or pass the path of a split YAML file")


def dump_split(split: SplitDef, path: str | os.PathLike[str], tokens_per_line: int = 6) -> None:
    """Write ``split`` as a compact YAML file (log names grouped by drive, tokens as a text block)."""
    lines = [f"name: {split.name}", f"folder: {split.folder}"]
    if split.dataset != "nuplan":
        lines.append(f"dataset: {split.dataset}")
    if split.description:
        lines.append(f"description: {yaml.safe_dump(split.description, width=10_000).splitlines()[0]}")
    if split.provenance:
        lines.append(f"provenance: {yaml.safe_dump(split.provenance, width=10_000).splitlines()[0]}")
    if split.log_names is not None:
        names = sorted(split.log_names)
        parts = [n.split("_") for n in names]
        if all(
            len(p) >= 3 and all(p) and not any(ch.isspace() for ch in n)
            for p, n in zip(parts, names, strict=True)
        ):
            groups: dict[str, list[str]] = {}
            for p in parts:
                groups.setdefault("_".join(p[:-2]), []).append("_".join(p[-2:]))
            lines.append("log_names:  # <drive>: <segment> ...; log name = <drive>_<segment>")
            lines += [f'  "{d}": "{" ".join(segs)}"' for d, segs in sorted(groups.items())]
        else:
            lines.append("log_names:")
            lines += [f'  - "{n}"' for n in names]
    if split.tokens is not None:
        tokens = sorted(split.tokens)
        lines.append(f"tokens: >-  # {len(tokens)} key-frame (lidar_pc) tokens")
        lines += [
            "  " + " ".join(tokens[i : i + tokens_per_line]) for i in range(0, len(tokens), tokens_per_line)
        ]
    Path(path).write_text("\n".join(lines) + "\n")


__all__ = ["SplitDef", "SplitError", "dump_split", "list_splits", "load_split", "split_from_dict"]
