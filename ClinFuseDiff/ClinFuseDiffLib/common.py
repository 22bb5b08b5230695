"""Pure-Python helpers of the ClinFuseDiff module and web app (no slicer, qt, vtk or torch).

The inference itself always runs in a subprocess, ``python -m ClinFuseDiffCore.cli infer ...``:
the same command a user runs in a shell. This file builds that command, runs it cancellably and
reads what it prints; ``logic.py`` turns MRML nodes into its input files and its output files
into MRML nodes.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading
from typing import Callable, Optional


def _(text: str) -> str:
    """Translate a user-facing string with Slicer's translation system when it is loaded."""
    slicerModule = sys.modules.get("slicer")
    i18n = getattr(slicerModule, "i18n", None) if slicerModule is not None else None
    if i18n is not None and hasattr(i18n, "translate"):
        return i18n.translate("ClinFuseDiff", text)
    return text


# (ClinFuseDiffCore modality name, short key used by the Slicer parameter node) in display order.
MODALITIES = [
    ("mri_t1", "t1"),
    ("mri_t1ce", "t1ce"),
    ("mri_t2", "t2"),
    ("mri_flair", "flair"),
    ("ct", "ct"),
    ("pet", "pet"),
]
MODALITY_BY_KEY = {key: name for name, key in MODALITIES}
KEY_BY_MODALITY = {name: key for name, key in MODALITIES}
DEVICES = ("auto", "cpu", "cuda")


def useFlagName(key: str) -> str:
    """``t1ce`` -> ``useT1ce`` (the parameter-node availability flag of a modality key)."""
    return "use" + key[0].upper() + key[1:]


def pathOrNone(path) -> Optional[pathlib.Path]:
    """An unset ctkPathLineEdit reads as '' or '.'; return None for those."""
    if path is None:
        return None
    text = str(path).strip()
    return None if text in ("", ".") else pathlib.Path(text)


def matchModalityName(name: str) -> Optional[str]:
    """The modality key (``t1``, ``t1ce``, ``t2``, ``flair``, ``ct``, ``pet``) a volume or file name suggests.

    Examples: ``BraTS2021_00001_t1ce`` -> ``t1ce``; ``T1_post_Gd`` -> ``t1ce``; ``sub-01_T1w`` -> ``t1``;
    ``T2-FLAIR`` -> ``flair``; ``CT head`` -> ``ct``; ``FDG PET`` -> ``pet``; ``Segmentation`` -> None.
    """
    n = name.lower()
    if "flair" in n:
        return "flair"
    if re.search(r"t1[\W_]*(ce|c|gd|post|contrast)(?![a-z])", n) or re.search(r"(^|[\W_])(gad|gado)", n):
        return "t1ce"
    if re.search(r"(^|[^a-z0-9])t1(w|[^a-z0-9]|$)", n) or re.search(r"t1(w|_|$)", n):
        return "t1"
    if re.search(r"(^|[^a-z0-9])t2(w|[^a-z0-9]|$)", n) or re.search(r"t2(w|_|$)", n):
        return "t2"
    if re.search(r"(^|[^a-z])(pet|fdg|suv)([^a-z]|$)", n):
        return "pet"
    if re.search(r"(^|[^a-z])(ct|cta|ncct)([^a-z]|$)", n):
        return "ct"
    return None


VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def volumeStem(path) -> Optional[str]:
    """``t1.nii.gz`` -> ``t1``; None when the name has no volume suffix (``.seg.nrrd`` is not a volume)."""
    name = pathlib.Path(path).name
    if name.lower().endswith(".seg.nrrd"):
        return None
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def matchModalityFiles(paths) -> dict:
    """``{modality name: path}`` for the volume files whose names suggest a modality (first match wins).

    Ground-truth labelmaps (``*seg*``, ``*label*``, ``*mask*``) are skipped.
    """
    matched = {}
    for path in sorted(pathlib.Path(p) for p in paths):
        stem = volumeStem(path)
        if stem is None or re.search(r"seg|label|mask", stem.lower()):
            continue
        key = matchModalityName(stem)
        if key is not None and MODALITY_BY_KEY[key] not in matched:
            matched[MODALITY_BY_KEY[key]] = path
    return matched


def parseClinicalValues(text: str) -> dict:
    """``"age=63; sex=M"`` -> ``{"age": "63", "sex": "M"}``; raise ValueError on a malformed pair."""
    values = {}
    for part in re.split(r"[;\n]", text or ""):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ValueError(_("Clinical value '{part}' is not of the form name=value (e.g. age=63).").format(part=part))
        name, value = (piece.strip() for piece in part.split("=", 1))
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_ .-]*", name):
            raise ValueError(_("Clinical variable name '{name}' is not allowed; use letters, digits and _.").format(name=name))
        if name in values:
            raise ValueError(_("Clinical variable '{name}' is given twice.").format(name=name))
        if "," in value or '"' in value:
            raise ValueError(_("Clinical value of '{name}' must not contain ',' or quotes.").format(name=name))
        values[name] = value
    return values


def tinyTrainArguments(folder) -> list:
    """``clinfusediff train`` arguments for the self-test's tiny checkpoint (synthetic cohort, CPU, ~1 min)."""
    return ["train", "--config", "demo", "--out", str(folder), "--no-progress",
            "experiment.device=cpu", "data.synth_patients=16", "data.synth_shape=[40,40,32]",
            "preprocessing.target_shape=[24,24,24]", "preprocessing.spacing=[4.0,4.0,4.0]",
            "model.encoder_widths=[8,8,16,16]", "model.embed_dim=32", "training.epochs=2",
            "training.batch_size=4", "diffusion.num_inference_steps=4"]


def predictionTableRows(record: dict) -> list:
    """``prediction.json`` record -> rows (section, name, value, 95 % lower, 95 % upper).

    A quantity without an interval (e.g. a non-predicted class of a record with
    ``interval_method: normal``) gets NaN bounds.
    """
    nan = float("nan")

    def bounds(interval) -> tuple:
        return tuple(interval) if interval is not None else (nan, nan)

    rows = []
    pred = record.get("prediction", {})
    task = record.get("task")
    if task == "classification":
        top = pred["predicted_class"]
        intervals = pred.get("probability_interval") or {}
        rows.append(("prediction", top, pred["probabilities"][top], *bounds(intervals.get(top))))
        for name in pred["class_names"]:
            rows.append(("probability", name, pred["probabilities"][name], *bounds(intervals.get(name))))
    else:
        key = "risk" if task == "survival" else "value"
        rows.append(("prediction", key, pred[key], *bounds(pred.get(f"{key}_interval"))))
    for name, value in (record.get("uncertainty") or {}).items():
        rows.append(("uncertainty", name, nan if value is None else value, nan, nan))
    for name, value in (record.get("contributions") or {}).items():
        rows.append(("contribution", name, value, nan, nan))
    for name in (record.get("modalities") or {}).get("missing", []):
        rows.append(("missing", name, nan, nan, nan))
    return rows


def parseProgressLine(line: str) -> Optional[tuple]:
    """``"PROGRESS 40 preprocess"`` (printed by ``clinfusediff infer``) -> ``(40, "preprocess")``."""
    m = re.match(r"^PROGRESS\s+(\d{1,3})\s*(.*)$", line.strip())
    if not m:
        return None
    return min(100, int(m.group(1))), m.group(2)


def errorFromOutput(lines: list, maxLines: int = 15) -> str:
    """The message to show for a failed run: the command's ``error:`` line(s), else its last lines."""
    text = [ln for ln in lines if ln.strip() and parseProgressLine(ln) is None]
    for i, line in enumerate(text):
        if "clinfusediff infer: error:" in line:
            return "\n".join(text[i:i + maxLines])
    return "\n".join(text[-maxLines:])


# --------------------------------------------------------------------------------- settings
@dataclasses.dataclass
class InferenceSettings:
    """What the user chose besides the volumes (the Slicer parameter node and the web form map to it).

    checkpoint: a ``.pt`` written by ``clinfusediff train``.
    useTTT, tttSteps: test-time training on/off and its steps (0 = the checkpoint's default).
    numSamples: number K of diffusion samples (the uncertainty).
    device: ``auto`` | ``cpu`` | ``cuda``.
    useClinical: whether the patient has clinical values; then ``clinicalCsv`` + ``clinicalPatientId``
        (a CSV with a ``patient_id`` column) or ``clinicalValues`` (``"age=63; sex=M"``).
    outputFolder: where to keep the files the command writes (None: a temporary folder).
    """

    checkpoint: Optional[pathlib.Path] = None
    useTTT: bool = True
    tttSteps: int = 0
    numSamples: int = 8
    device: str = "auto"
    useClinical: bool = False
    clinicalCsv: Optional[pathlib.Path] = None
    clinicalPatientId: str = ""
    clinicalValues: str = ""
    outputFolder: Optional[pathlib.Path] = None

    def problem(self) -> Optional[str]:
        """Why a run cannot start with these settings (a sentence), or None."""
        ckpt = pathOrNone(self.checkpoint)
        if ckpt is None:
            return _("Choose a checkpoint file.")
        if not ckpt.is_file():
            return _("Checkpoint {path} does not exist.").format(path=ckpt)
        if self.device not in DEVICES:
            return _("Device '{device}' is not one of {allowed}.").format(device=self.device, allowed=", ".join(DEVICES))
        if not 1 <= int(self.numSamples) <= 128:
            return _("Samples must be between 1 and 128 (got {n}).").format(n=self.numSamples)
        if not 0 <= int(self.tttSteps) <= 1000:
            return _("Test-time training steps must be between 0 and 1000 (got {n}).").format(n=self.tttSteps)
        if self.useClinical:
            csv = pathOrNone(self.clinicalCsv)
            if csv is None and not self.clinicalValues.strip():
                return _("Clinical is ticked: give a CSV file and patient ID, or type values.")
            if csv is not None and not self.clinicalPatientId.strip():
                return _("Give the patient ID of the CSV row.")
            if csv is None:
                try:
                    parseClinicalValues(self.clinicalValues)
                except ValueError as e:
                    return str(e)
        return None


def writeClinicalCsv(values: dict, patientId: str, path: pathlib.Path) -> None:
    """One-row CSV (``patient_id`` + the typed values) for ``--clinical``."""
    path.write_text(",".join(["patient_id", *values]) + "\n" + ",".join([patientId, *values.values()]) + "\n",
                    encoding="utf-8")


def inferArguments(settings: InferenceSettings, inputFiles: dict, outputDir, inputDir=None,
                   reference: Optional[str] = None) -> list:
    """``clinfusediff infer`` arguments (everything after ``python -m ClinFuseDiffCore.cli``).

    Args:
        settings: the user's choices.
        inputFiles: ``{modality name: file}`` of the volumes the patient has, in display order.
        outputDir: ``--out``.
        inputDir: where a CSV of typed clinical values is written (needed only for typed values).
        reference: the modality whose grid the segmentation is written on (default: the first).
    """
    problem = settings.problem()
    if problem:
        raise ValueError(problem)
    if not inputFiles:
        raise ValueError(_("Select and tick at least one image volume."))
    unknown = sorted(set(inputFiles) - set(KEY_BY_MODALITY))
    if unknown:
        raise ValueError(_("{names} are not image modalities; allowed: {allowed}.").format(
            names=", ".join(unknown), allowed=", ".join(KEY_BY_MODALITY)))
    args = ["infer", "--checkpoint", str(pathOrNone(settings.checkpoint))]
    for name, path in inputFiles.items():
        args += ["--modality", f"{name}={path}"]
    args += ["--reference", reference or next(iter(inputFiles))]
    if settings.useClinical:
        csv = pathOrNone(settings.clinicalCsv)
        if csv is not None:
            args += ["--clinical", str(csv), "--id", settings.clinicalPatientId.strip()]
        else:
            if inputDir is None:
                raise ValueError("inputDir is needed to write the typed clinical values")
            values = parseClinicalValues(settings.clinicalValues)
            pid = settings.clinicalPatientId.strip() or "patient"
            csvPath = pathlib.Path(inputDir) / "clinical.csv"
            writeClinicalCsv(values, pid, csvPath)
            args += ["--clinical", str(csvPath), "--id", pid, "--id-column", "patient_id"]
    if not settings.useTTT:
        args += ["--no-ttt"]
    elif int(settings.tttSteps) > 0:
        args += ["--ttt-steps", str(int(settings.tttSteps))]
    args += ["--samples", str(int(settings.numSamples)), "--device", settings.device, "--out", str(outputDir)]
    return args


def inferEnvironment(settings: InferenceSettings, corePath: Optional[pathlib.Path] = None, basePythonPath: str = "") -> dict:
    """Variables the subprocess needs on top of its parent's environment.

    ``PYTHONPATH`` starts with the folder holding ClinFuseDiffCore (a source tree); CPU mode hides
    the GPUs (``CUDA_VISIBLE_DEVICES=-1``), as the Slicer module always did.
    """
    env = {"PYTHONUNBUFFERED": "1"}
    paths = [str(corePath)] if corePath is not None else []
    if basePythonPath:
        paths.append(basePythonPath)
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    if settings.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    return env


def corePythonPath(moduleDir: pathlib.Path) -> pathlib.Path:
    """The folder that holds the ClinFuseDiffCore package.

    Installed extension: ``qt-scripted-modules/ClinFuseDiffCore`` beside the module. Source tree
    (``<repo>/ClinFuseDiff``): ``<repo>/ClinFuseDiffCore``.
    """
    moduleDir = pathlib.Path(moduleDir)
    for candidate in (moduleDir, moduleDir.parent):
        if (candidate / "ClinFuseDiffCore" / "__init__.py").exists():
            return candidate
    raise RuntimeError(_("ClinFuseDiffCore was not found next to {path} or in its parent folder; reinstall the extension.").format(path=moduleDir))


# --------------------------------------------------------------------------------- subprocess
def popenLauncher(cmd: list, environment: dict) -> subprocess.Popen:
    """Start ``cmd`` with ``environment`` added to this process's environment; output as text lines.

    The child gets its own session (process group), so :meth:`InferenceProcess.cancel` can stop
    it together with anything it started.
    """
    env = {**os.environ, **environment}
    kwargs = {}
    if os.name == "posix":
        kwargs["start_new_session"] = True
    else:  # pragma: no cover - Windows
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs)


class InferenceProcess:
    """A running ``clinfusediff infer``: output read by a thread, polled from the caller's thread.

    ``launcher(cmd, environment) -> Popen`` starts it (default :func:`popenLauncher`; the Slicer
    module passes one based on ``slicer.util.launchConsoleProcess``). Call :meth:`poll` regularly
    (a QTimer in Slicer, an asyncio task in the web app); it forwards output lines and
    ``(percent, stage)`` progress and returns False once the process has ended and its output is read.
    """

    def __init__(self, cmd: list, environment: dict, launcher: Optional[Callable] = None) -> None:
        self.cmd = list(cmd)
        self.environment = dict(environment)
        self.lines: list = []
        self.cancelled = False
        self.progress = (0, "")
        self._proc = (launcher or popenLauncher)(self.cmd, self.environment)
        self._queue: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stream = self._proc.stdout
        while True:
            try:
                line = stream.readline()
            except (UnicodeDecodeError, ValueError):
                continue
            if not line:
                break
            self._queue.put(line.rstrip())

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> Optional[int]:
        return self._proc.poll()

    def poll(self, logCallback: Optional[Callable] = None, progressCallback: Optional[Callable] = None) -> bool:
        """Forward queued output; True while the process runs or output is still unread."""
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            self.lines.append(line)
            progress = parseProgressLine(line)
            if progress is not None:
                self.progress = progress
                if progressCallback is not None:
                    progressCallback(*progress)
            elif logCallback is not None:
                logCallback(line)
        if self._proc.poll() is None or self._reader.is_alive() or not self._queue.empty():
            return True
        return False

    def wait(self, logCallback=None, progressCallback=None, interval: float = 0.1, idle: Optional[Callable] = None) -> int:
        """Block until the process has ended (``idle()`` runs between polls); return its exit code."""
        import time

        while self.poll(logCallback, progressCallback):
            if idle is not None:
                idle()
            time.sleep(interval)
        return self._proc.returncode

    def cancel(self) -> None:
        """Stop the process and its children (its process group; PythonSlicer is a launcher)."""
        if self._proc.poll() is not None:
            return
        self.cancelled = True
        try:
            import psutil

            parent = psutil.Process(self._proc.pid)
            for child in parent.children(recursive=True):
                child.kill()
            parent.kill()
            return
        except ImportError:
            pass
        except Exception:  # already gone
            return
        try:
            # Only a process group of its own (popenLauncher): never the group of this process.
            if os.name == "posix" and os.getpgid(self._proc.pid) != os.getpgid(0):
                os.killpg(os.getpgid(self._proc.pid), signal.SIGKILL)
            else:
                self._proc.kill()
        except (ProcessLookupError, PermissionError, OSError):
            self._proc.kill()
