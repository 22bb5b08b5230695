"""What a checkpoint says about its run: is its training finished, and may a resume change it.

* ``FINISHED_KEY``: the trainer stores ``checkpoint["finished"] = False`` in every checkpoint
  written during the epochs and sets it to ``True`` in ``best.pt`` and ``last.pt`` once the
  schedule (or early stopping) ended. ``evaluate`` and ``infer`` refuse a checkpoint that is not
  finished (or that predates the flag) unless told (``--allow-unfinished``).
* ``RESUME_MAY_CHANGE``: the config keys that ``train --resume`` may set to another value than
  the checkpoint's. Everything else (seed, learning rate, split fractions, modalities, fusion,
  model sizes, preprocessing, ...) would silently change the run being continued, so a resume
  with such an override is refused, naming the keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

FINISHED_KEY = "finished"

#: Config keys (or whole sections, ending in ".") that a resumed run may change: where the
#: cohort/cache/outputs are (the split is checked against the checkpoint's), the machine
#: (device, threads, loader workers), logging, and ``training.epochs`` (to extend a schedule;
#: the cosine schedule is then stretched to the new length).
RESUME_MAY_CHANGE = (
    "experiment.name", "experiment.output_dir", "experiment.device", "experiment.num_threads",
    "data.root", "data.cache_dir", "data.num_workers",
    "training.epochs", "training.log_every",
)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _may_change(key: str) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in RESUME_MAY_CHANGE)


def resume_conflicts(current: Mapping[str, Any], saved: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint value, new value) of every config key that differs and may not change."""
    a, b = flatten(saved), flatten(current)
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if _norm(va) != _norm(vb) and not _may_change(k):
            out.append((k, va, vb))
    return out


def _norm(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_norm(x) for x in v]
    if isinstance(v, list):
        return [_norm(x) for x in v]
    if isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    return v


def check_resume_config(current: Mapping[str, Any], ckpt: Mapping[str, Any], path: str | Path) -> None:
    """Refuse a resume whose config differs from the checkpoint's outside ``RESUME_MAY_CHANGE``.

    Raises:
        ValueError: naming every such key with both values.
    """
    saved = ckpt.get("config")
    if not isinstance(saved, Mapping):
        raise ValueError(f"--resume {path}: the checkpoint holds no config; it cannot be resumed")
    bad = resume_conflicts(current, saved)
    if bad:
        shown = "; ".join(f"{k}: checkpoint {va!r}, now {vb!r}" for k, va, vb in bad[:12])
        more = f" (and {len(bad) - 12} more)" if len(bad) > 12 else ""
        raise ValueError(
            f"--resume {path}: a resumed run keeps its checkpoint's config, but these keys differ: "
            f"{shown}{more}. Drop those overrides (without --config, `train --resume` starts from the "
            f"checkpoint's own config), or start a new run without --resume. Keys a resume may "
            f"change: {', '.join(RESUME_MAY_CHANGE)}")


def check_resume_split(split_path: Path, ckpt_split: Mapping[str, Any], path: str | Path) -> bool:
    """Make ``split_path`` hold the checkpoint's split: write it when absent, refuse a different one.

    Returns:
        True when the file was written.

    Raises:
        ValueError: the file exists with another split (naming how many patients moved).
    """
    import json

    from ..utils import atomic_write_json

    # Order matters (it is the datasets' order, hence which sample each step draws).
    want = {k: [str(x) for x in ckpt_split.get(k, [])] for k in ("train", "val", "test")}
    if split_path.is_file():
        try:
            have_raw = json.loads(split_path.read_text(encoding="utf-8"))
            have = {k: [str(x) for x in have_raw.get(k, [])] for k in ("train", "val", "test")}
        except (ValueError, AttributeError) as e:
            raise ValueError(f"--resume {path}: split file {split_path} is unreadable ({e}); delete it "
                             "and the checkpoint's split is written there") from e
        if have != want:
            moved = sum(len(set(want[k]) - set(have[k])) for k in want)
            how = f"{moved} patients in another part" if moved else "the same patients in another order"
            raise ValueError(
                f"--resume {path}: split file {split_path} differs from the checkpoint's split "
                f"({how}); a resumed run keeps its split. Delete "
                f"{split_path} (the checkpoint's split is written there) or resume into the run's "
                "own folder")
        return False
    atomic_write_json(split_path, {**want, "restored_from": str(path)})
    return True


def training_status(ckpt: Mapping[str, Any]) -> tuple[bool, str]:
    """(finished, description) of a checkpoint's training, e.g. "unfinished (stopped after epoch 3
    of 300, best epoch 2)"."""
    cfg = ckpt.get("config") or {}
    planned = (cfg.get("training") or {}).get("epochs", "?") if isinstance(cfg, Mapping) else "?"
    epoch, best = ckpt.get("epoch", "?"), ckpt.get("best_epoch", "?")
    flag = ckpt.get(FINISHED_KEY)
    if flag is True:
        return True, f"finished (epoch {epoch} of {planned}, best epoch {best})"
    if flag is None:
        return False, ("records no training status (written before checkpoints recorded whether "
                       "their training finished)")
    return False, f"unfinished (stopped after epoch {epoch} of {planned}, best epoch {best})"


def require_finished(path: str | Path, ckpt: Mapping[str, Any], allow_unfinished: bool,
                     flag: str = "--allow-unfinished") -> str:
    """Refuse a checkpoint whose training did not finish, unless ``allow_unfinished``.

    Returns:
        The status description (for a warning when allowed).

    Raises:
        ValueError: naming the file, its status and what to do.
    """
    ok, why = training_status(ckpt)
    if not ok and not allow_unfinished:
        raise ValueError(f"checkpoint {path}: training {why}; finish it (clinfusediff train --resume "
                         f"<run>/last.pt) or pass {flag} to use it anyway")
    return why


__all__ = ["FINISHED_KEY", "RESUME_MAY_CHANGE", "check_resume_config", "check_resume_split",
           "flatten", "require_finished", "resume_conflicts", "training_status"]
