"""Small shared helpers: atomic writes, safe path joins, device choice."""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def safe_id(patient_id: str) -> str:
    """Return ``patient_id`` if it is safe to use as a file or folder name, else raise.

    Allowed: letters, digits, ``.``, ``_``, ``-``, not starting with a dot, never ``..``.
    """
    pid = str(patient_id)
    if not _SAFE_ID.match(pid) or ".." in pid:
        raise ValueError(
            f"patient ID {pid!r} cannot be used as a file name (only letters, digits, '.', '_' "
            "and '-' are allowed, no path separators or '..'); rename the patient"
        )
    return pid


def safe_join(base: str | os.PathLike, *parts: str) -> Path:
    """Join ``parts`` under ``base`` and refuse any result outside ``base``."""
    base_p = Path(base).resolve()
    out = base_p.joinpath(*parts).resolve()
    if out != base_p and base_p not in out.parents:
        raise ValueError(f"path {'/'.join(parts)!r} escapes its folder {str(base_p)!r}")
    return out


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A killed run leaves at most a ``.tmp`` file, never a half-written ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's process ID is in the name, so a later run can tell a dead run's leftover
    # (removed by ``remove_stale_temps``) from a file another live process is still writing.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.p{os.getpid()}-",
                               suffix=(suffix or path.suffix) + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_p = Path(tmp)
    try:
        yield tmp_p
        with open(tmp_p, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the result the usual permissions (0666 minus the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_p, 0o666 & ~umask)
        os.replace(tmp_p, path)
    finally:
        if tmp_p.exists():
            tmp_p.unlink()


# ``atomic_path``'s temporary names: ".<name>.p<pid>-<random><suffix>.tmp"
_TEMP_NAME = re.compile(r"^\..+\.p(?P<pid>\d+)-[A-Za-z0-9_]+.*\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


def remove_stale_temps(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Remove the temporary files that killed runs left in ``folder`` (``atomic_path``'s names,
    written by a process that no longer exists); returns what was removed.

    Files of live processes (another run writing now) and every other file are left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for f in (folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")):
        m = _TEMP_NAME.match(f.name)
        if m is None or not f.is_file() or _pid_alive(int(m.group("pid"))):
            continue
        try:
            f.unlink()
            removed.append(f)
        except FileNotFoundError:
            pass
    return removed


# --------------------------------------------------------------------------------------------
# Faults of the machine, not of the data
# --------------------------------------------------------------------------------------------
#: errno values that mean "the machine cannot read or write there" (disk full, quota, read-only
#: file system, no permission, I/O error): a run stops on them instead of skipping a patient.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                                errno.EPERM, errno.EIO})

_FIXES = {
    errno.ENOSPC: "the disk is full: free space there, or point the output/cache folder at a disk "
                  "with room, then rerun (finished files are reused)",
    errno.EDQUOT: "the disk quota is used up: free space there, or point the output/cache folder "
                  "elsewhere, then rerun (finished files are reused)",
    errno.EROFS: "the file system is read-only: choose a writable output/cache folder, then rerun",
    errno.EACCES: "no permission: fix the folder's permissions or choose one you can write, then rerun",
    errno.EPERM: "operation not permitted: fix the folder's permissions or choose another one, then rerun",
    errno.EIO: "the disk reported an I/O error: check the disk (dmesg, fsck) or use another one, then rerun",
}


class EnvironmentFault(RuntimeError):
    """The machine failed (disk full, read-only, no permission, I/O error), not the data: the run
    stops with this one-line message naming the path and the fix, instead of skipping patients.

    Attributes:
        path: the file or folder concerned; errno: the OS error number.
    """

    def __init__(self, message: str, path: str | None = None, errno_: int | None = None):
        super().__init__(message)
        self.path, self.errno = path, errno_

    def __reduce__(self):  # keeps path/errno across process pools
        return (type(self), (str(self), self.path, self.errno))


def is_environment_fault(e: BaseException) -> bool:
    """True for an ``EnvironmentFault`` or an ``OSError`` whose errno is in ``ENVIRONMENT_ERRNOS``."""
    return isinstance(e, EnvironmentFault) or (
        isinstance(e, OSError) and getattr(e, "errno", None) in ENVIRONMENT_ERRNOS)


def environment_fault(e: OSError, action: str = "write", path: str | os.PathLike | None = None
                      ) -> EnvironmentFault:
    """The ``EnvironmentFault`` for an OS error: ``cannot <action> <path>: <reason>; <fix>``."""
    if isinstance(e, EnvironmentFault):
        return e
    where = str(path if path is not None else (e.filename or "?"))
    code = getattr(e, "errno", None)
    reason = e.strerror or str(e)
    name = errno.errorcode.get(code, "") if code is not None else ""
    fix = _FIXES.get(code, "check the disk and the folder's permissions, then rerun")
    return EnvironmentFault(f"cannot {action} {where}: {reason}{f' ({name})' if name else ''}; {fix}",
                            where, code)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA GPU; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} not in ['auto', 'cpu', 'cuda']")
    return device


def check_output_dir(out: str | os.PathLike, flag: str = "--out",
                     inputs: "dict[str, str | os.PathLike] | None" = None,
                     not_equal: "dict[str, str | os.PathLike] | None" = None) -> Path:
    """Refuse an output folder that cannot be one, before any work is done.

    Args:
        out: the folder a command will create or reuse.
        flag: the option named in the errors.
        inputs: ``{description: folder}`` of input folders that ``out`` must be neither equal to
            nor inside (nothing writes into the user's input folders).
        not_equal: ``{description: folder}`` that ``out`` must not be (e.g. the folder of an input
            file: a subfolder of it is fine).

    Returns:
        ``out`` as a Path.

    Raises:
        ValueError: ``out`` (or a folder above it) is an existing file, or lies in an input folder.
    """
    out_p = Path(out).expanduser()
    for p in (out_p, *out_p.parents):
        if p.exists():
            if not p.is_dir():
                what = "is an existing file" if p == out_p else f"is under {p}, an existing file"
                raise ValueError(f"{flag} {out_p} {what}; give a folder (it is created if needed)")
            break
    resolved = out_p.resolve()
    for desc, folder in (inputs or {}).items():
        f = Path(folder).expanduser().resolve()
        if resolved == f or f in resolved.parents:
            raise ValueError(f"{flag} {out_p} is {'the' if resolved == f else 'inside the'} {desc} "
                             f"{f}; input folders are never written to, choose an output folder elsewhere")
    for desc, folder in (not_equal or {}).items():
        if resolved == Path(folder).expanduser().resolve():
            raise ValueError(f"{flag} {out_p} is the folder of the {desc}; outputs are never written "
                             "beside the inputs, choose another output folder (e.g. a new subfolder)")
    return out_p
