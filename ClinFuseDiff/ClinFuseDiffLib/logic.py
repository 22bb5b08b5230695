"""MRML work of the ClinFuseDiff module on an explicitly passed scene, without Qt.

Runs inside 3D Slicer and on the ``slicer-core`` package (Slicer's MRML, storage nodes and module
logics without the application), which the trame-slicer web app and the tests use. Only Slicer's
own readers and writers touch files: volumes through ``vtkMRMLVolumeArchetypeStorageNode``, the
segmentation through ``vtkSlicerSegmentationsModuleLogic.LoadSegmentationFromFile``, the scene
through its storage nodes and ``vtkMRMLScene.Commit``. Nothing here uses ``slicer.app``,
``slicer.mrmlScene``, ``slicer.util.loadVolume`` or Qt.

Typical use (the Slicer module's Logic and the web app do exactly this)::

    logic = ClinFuseDiffMRMLLogic(scene)
    t1 = logic.readVolume("t1.nii.gz")
    job = logic.startInference({"mri_t1": t1}, InferenceSettings(checkpoint=path, device="cpu"))
    while job.poll(print, lambda pc, stage: print(pc, stage)):
        time.sleep(0.2)            # or a QTimer / an asyncio task
    results = job.finish()         # segmentation node, table node, prediction.json record
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
import re
import shutil
import sys
import tempfile
import time
from typing import Callable, Optional

import slicer
import vtk

try:  # inside the module folder (Slicer, the web app) and as a package (tests)
    from .common import (
        KEY_BY_MODALITY,
        InferenceProcess,
        InferenceSettings,
        _,
        corePythonPath,
        errorFromOutput,
        inferArguments,
        inferEnvironment,
        matchModalityName,
        pathOrNone,
        predictionTableRows,
    )
except ImportError:  # pragma: no cover - loaded as a top-level module
    from common import (  # type: ignore[no-redef]
        KEY_BY_MODALITY,
        InferenceProcess,
        InferenceSettings,
        _,
        corePythonPath,
        errorFromOutput,
        inferArguments,
        inferEnvironment,
        matchModalityName,
        pathOrNone,
        predictionTableRows,
    )

MODULE_DIR = pathlib.Path(__file__).resolve().parent.parent  # the folder of ClinFuseDiff.py
TABLE_COLUMNS = ("Section", "Name", "Value", "95% lower", "95% upper")


@dataclasses.dataclass
class InferenceResults:
    """What one run produced: nodes in the scene and the parsed ``prediction.json``."""

    segmentationNode: Optional[object]
    tableNode: object
    record: dict
    outputDir: pathlib.Path
    files: dict  # name -> path of what is kept (empty when the output folder was temporary)
    seconds: float = 0.0


def _safeFileName(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "node"


class ClinFuseDiffMRMLLogic:
    """The module's MRML work, on ``scene``.

    Args:
        scene: a ``vtkMRMLScene`` (``slicer.mrmlScene`` in Slicer; trame-slicer's ``SlicerApp.scene``).
        segmentationsLogic: the scene's ``vtkSlicerSegmentationsModuleLogic`` when the host has one
            (Slicer: ``slicer.modules.segmentations.logic()``; trame-slicer: ``segmentations_logic``).
            Without one, a logic is created and attached to the scene: that registers the
            segmentation converter rules, without which a segmentation copy silently ends empty.
    """

    def __init__(self, scene, segmentationsLogic=None) -> None:
        if scene is None:
            raise ValueError("ClinFuseDiffMRMLLogic needs a vtkMRMLScene")
        self.scene = scene
        if segmentationsLogic is None:
            segmentationsLogic = self._hostSegmentationsLogic(scene)
        if segmentationsLogic is None:
            segmentationsLogic = slicer.vtkSlicerSegmentationsModuleLogic()
            segmentationsLogic.SetMRMLScene(scene)
            self._ownColorNodes(scene)
        self.segmentationsLogic = segmentationsLogic

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _hostSegmentationsLogic(scene):
        """Slicer's own segmentations logic when running in the application on its scene."""
        modules = getattr(slicer, "modules", None)
        if modules is None or getattr(slicer, "mrmlScene", None) is not scene:
            return None
        try:
            return modules.segmentations.logic()
        except AttributeError:
            return None

    def _ownColorNodes(self, scene) -> None:
        """Default colour tables (Grey, GenericAnatomyColors, ...) for display nodes of a bare scene."""
        if scene.GetNodeByID("vtkMRMLColorTableNodeGrey") is not None:
            return
        self._appLogic = slicer.vtkSlicerApplicationLogic()
        self._appLogic.SetMRMLScene(scene)
        colorLogic = self._appLogic.GetColorLogic()
        colorLogic.SetMRMLScene(scene)
        colorLogic.AddDefaultColorNodes()

    # ------------------------------------------------------------------ volumes
    def readVolume(self, path, name: Optional[str] = None):
        """Load a volume file (NIfTI, NRRD, MHA, ...) with Slicer's volume storage node.

        Returns a ``vtkMRMLScalarVolumeNode`` with display nodes; its IJKToRAS is what Slicer's
        ITK-based reader makes of the file (qform/sform rules, LPS -> RAS).
        """
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(_("Volume file {path} does not exist.").format(path=path))
        if name is None:
            name = path.name
            for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
                if name.lower().endswith(suffix):
                    name = name[: -len(suffix)]
                    break
        storageNode = self.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storageNode.SetFileName(str(path))
        storageNode.SetSingleFile(True)
        volumeNode = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        volumeNode.SetAndObserveStorageNodeID(storageNode.GetID())
        if not storageNode.ReadData(volumeNode) or volumeNode.GetImageData() is None:
            self.scene.RemoveNode(volumeNode)
            self.scene.RemoveNode(storageNode)
            raise ValueError(_("Slicer could not read {path} as a volume.").format(path=path))
        volumeNode.CreateDefaultDisplayNodes()
        return volumeNode

    def writeVolume(self, node, path) -> None:
        """Write a volume node to ``path`` without changing the node's own storage node.

        Raises ValueError when the node is under a transform (harden it first): the file would
        lose it and the results would not line up.
        """
        if node.GetParentTransformNode() is not None:
            raise ValueError(_("Volume '{name}' is under a transform. Harden the transform (Data module, right-click, Harden transform) and try again.").format(name=node.GetName()))
        if node.GetImageData() is None:
            raise ValueError(_("Volume '{name}' has no image data.").format(name=node.GetName()))
        storageNode = self.scene.CreateNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        try:
            storageNode.SetFileName(str(path))
            storageNode.UseCompressionOff()
            ok = storageNode.WriteData(node)
        finally:
            storageNode.UnRegister(None)
        if not ok:
            raise RuntimeError(_("Could not write volume '{name}' to {path}.").format(name=node.GetName(), path=path))

    @staticmethod
    def ijkToRas(node):
        """The node's 4x4 IJK -> RAS matrix as a numpy array (without any parent transform)."""
        import numpy as np

        m = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(m)
        return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])

    def volumeNodes(self) -> list:
        """Scalar volumes of the scene (labelmaps excluded), in the order they were added."""
        nodes = []
        for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
            node = self.scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
            if not node.IsA("vtkMRMLLabelMapVolumeNode"):
                nodes.append(node)
        return nodes

    def matchVolumesByName(self) -> dict:
        """``{modality key: volume node}`` of the scene's volumes whose names suggest a modality (first wins)."""
        matched = {}
        for node in self.volumeNodes():
            key = matchModalityName(node.GetName())
            if key is not None and key not in matched:
                matched[key] = node
        return matched

    # ------------------------------------------------------------------ running
    def startInference(self, volumes: dict, settings: InferenceSettings, *,
                       pythonExecutable: Optional[str] = None, environment: Optional[dict] = None,
                       launcher: Optional[Callable] = None, workDir=None,
                       segmentationNode=None, tableNode=None) -> "InferenceJob":
        """Write the volumes to a work folder and start ``clinfusediff infer`` on them.

        Args:
            volumes: ``{modality name: volume node}`` of the modalities the patient has, in order;
                the first is the reference grid of the segmentation.
            settings: checkpoint, TTT, samples, device, clinical values, output folder.
            pythonExecutable: the Python that runs ``-m ClinFuseDiffCore.cli`` (Slicer:
                PythonSlicer; elsewhere this interpreter).
            environment: variables added to the subprocess's environment (``PYTHONPATH`` is
                prefixed with the folder holding ClinFuseDiffCore).
            launcher: ``(cmd, environment) -> Popen`` (default: subprocess in its own process group).
            workDir: parent of the temporary work folder (default: the system temporary folder).
            segmentationNode, tableNode: nodes that receive the results (new ones when None).
        """
        for name, node in volumes.items():
            if name not in KEY_BY_MODALITY:
                raise ValueError(_("{name} is not an image modality; allowed: {allowed}.").format(
                    name=name, allowed=", ".join(KEY_BY_MODALITY)))
            if node is None:
                raise ValueError(_("{mod} is ticked but no volume is selected.").format(mod=name))
        problem = settings.problem()
        if problem:
            raise ValueError(problem)
        if not volumes:
            raise ValueError(_("Select and tick at least one image volume."))
        work = pathlib.Path(tempfile.mkdtemp(prefix="ClinFuseDiff-", dir=str(workDir) if workDir else None))
        try:
            keep = pathOrNone(settings.outputFolder)
            outputDir = keep if keep is not None else work / "output"
            inputDir = work / "input"
            inputDir.mkdir(parents=True)
            files = {}
            for name, node in volumes.items():
                files[name] = inputDir / f"{name}.nrrd"
                self.writeVolume(node, files[name])
            args = inferArguments(settings, files, outputDir, inputDir=inputDir)
            env = dict(environment or {})
            base = env.pop("PYTHONPATH", "")
            env.update(inferEnvironment(settings, corePythonPath(MODULE_DIR), base))
            cmd = [pythonExecutable or sys.executable, "-m", "ClinFuseDiffCore.cli", *args]
            logging.info("ClinFuseDiff: running " + " ".join(cmd))
            process = InferenceProcess(cmd, env, launcher)
        except Exception:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return InferenceJob(self, process, work, outputDir, keep is not None, next(iter(volumes.values())),
                            segmentationNode, tableNode)

    def runInference(self, volumes: dict, settings: InferenceSettings, logCallback=None, progressCallback=None,
                     idle: Optional[Callable] = None, **kwargs) -> InferenceResults:
        """:meth:`startInference`, wait, :meth:`InferenceJob.finish` (raises RuntimeError on failure)."""
        job = self.startInference(volumes, settings, **kwargs)
        job.process.wait(logCallback, progressCallback, idle=idle)
        return job.finish()

    # ------------------------------------------------------------------ results
    def importResults(self, outputDir, referenceVolume, segmentationNode=None, tableNode=None) -> InferenceResults:
        """Load ``*.seg.nrrd`` into a segmentation node and ``prediction.json`` into a table node."""
        outputDir = pathlib.Path(outputDir)
        predictionFile = outputDir / "prediction.json"
        if not predictionFile.exists():
            raise RuntimeError(_("{path} was not written.").format(path=predictionFile))
        # `infer` writes outputs.json last, naming the patient and each file's SHA-256: without it
        # (an interrupted run) or with a changed file, the folder may mix two runs' outputs.
        manifestFile = outputDir / "outputs.json"
        if not manifestFile.exists():
            raise RuntimeError(_("{path} was not written: the outputs are incomplete.").format(path=manifestFile))
        manifest = json.loads(manifestFile.read_text(encoding="utf-8"))
        for name, digest in (manifest.get("files") or {}).items():
            if hashlib.sha256((outputDir / name).read_bytes()).hexdigest() != digest:
                raise RuntimeError(_("{path} differs from {manifest}: the folder mixes two runs.").format(
                    path=outputDir / name, manifest=manifestFile))
        record = json.loads(predictionFile.read_text(encoding="utf-8"))
        segFiles = [outputDir / n for n in (manifest.get("files") or {}) if n.endswith(".seg.nrrd")]
        base = referenceVolume.GetName()
        if segFiles:
            if segmentationNode is None:
                segmentationNode = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{base} ClinFuseDiff segmentation")
            self.loadSegmentationInto(segFiles[0], segmentationNode, referenceVolume)
        if tableNode is None:
            tableNode = self.scene.AddNewNodeByClass("vtkMRMLTableNode", f"{base} ClinFuseDiff prediction")
        self.fillPredictionTable(record, tableNode)
        return InferenceResults(segmentationNode, tableNode, record, outputDir, {})

    def loadSegmentationInto(self, path, segmentationNode, referenceVolume) -> None:
        """Read a ``.seg.nrrd`` (names, colours, label values from the file) into an existing node.

        Reads with Slicer's segmentation storage node, copies into ``segmentationNode``, sets the
        reference geometry to ``referenceVolume`` and adds a closed surface for the 3D view.
        """
        loaded = self.segmentationsLogic.LoadSegmentationFromFile(str(path), False)
        if loaded is None:
            raise RuntimeError(_("Slicer could not read the segmentation {path}.").format(path=path))
        try:
            if loaded.GetSegmentation().GetNumberOfSegments() == 0:
                raise RuntimeError(_("The segmentation {path} has no segments.").format(path=path))
            segmentationNode.GetSegmentation().DeepCopy(loaded.GetSegmentation())
        finally:
            storage = loaded.GetStorageNode()
            self.scene.RemoveNode(loaded)
            if storage is not None:
                self.scene.RemoveNode(storage)
        if segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
            raise RuntimeError(_("Copying the segmentation {path} lost its segments (no converter rules registered?).").format(path=path))
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.CreateClosedSurfaceRepresentation()

    def segmentArray(self, segmentationNode, segmentName: str, referenceVolume):
        """(K, J, I) uint8 mask of a segment on the grid of ``referenceVolume`` (Slicer's own export)."""
        import numpy as np
        from vtk.util import numpy_support

        segmentId = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(segmentName)
        if not segmentId:
            raise KeyError(f"no segment named {segmentName!r}")
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        try:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segmentId)
            if not self.segmentationsLogic.ExportSegmentsToLabelmapNode(segmentationNode, ids, labelmap, referenceVolume):
                raise RuntimeError(f"exporting segment {segmentName!r} failed")
            image = labelmap.GetImageData()
            dims = image.GetDimensions()
            arr = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
            return (arr > 0).astype(np.uint8)
        finally:
            self.scene.RemoveNode(labelmap)

    @staticmethod
    def fillPredictionTable(record: dict, tableNode) -> None:
        """One row per quantity: (section, name, value, lower, upper).

        Sections: ``prediction`` (predicted class / risk / value), ``probability`` (each class,
        with its 95 % interval over the K samples), ``uncertainty`` (std, entropy, mutual
        information), ``contribution`` (each modality used), ``missing`` (modalities absent).
        """
        rows = predictionTableRows(record)
        table = tableNode.GetTable()
        tableNode.RemoveAllColumns()
        columns = [vtk.vtkStringArray(), vtk.vtkStringArray(), vtk.vtkDoubleArray(), vtk.vtkDoubleArray(), vtk.vtkDoubleArray()]
        for column, title in zip(columns, TABLE_COLUMNS):
            column.SetName(title)
            table.AddColumn(column)
        table.SetNumberOfRows(len(rows))
        for r, row in enumerate(rows):
            for c, value in enumerate(row):
                table.SetValue(r, c, vtk.vtkVariant(str(value) if c < 2 else float(value)))
        tableNode.Modified()
        tableNode.SetAttribute("ClinFuseDiff.patient_id", str(record.get("patient_id", "")))
        tableNode.SetAttribute("ClinFuseDiff.checkpoint_sha256", str((record.get("model") or {}).get("checkpoint_sha256", "")))

    @staticmethod
    def tableRows(tableNode) -> list:
        """The rows of a prediction table as (section, name, value, lower, upper) tuples."""
        table = tableNode.GetTable()
        rows = []
        for r in range(table.GetNumberOfRows()):
            cells = [table.GetValue(r, c) for c in range(table.GetNumberOfColumns())]
            rows.append((cells[0].ToString(), cells[1].ToString(), *(float(v.ToDouble()) for v in cells[2:5])))
        return rows

    # ------------------------------------------------------------------ scene
    def saveScene(self, mrmlPath) -> pathlib.Path:
        """Save the scene as ``mrmlPath`` with every storable node's data beside it (Slicer's storage nodes).

        Each node is written with its default format (volumes ``.nrrd``, segmentations
        ``.seg.nrrd``, tables ``.tsv``) into the folder of ``mrmlPath``; node attributes (e.g.
        the prediction table's patient ID and checkpoint hash) travel in the ``.mrml``.
        """
        mrmlPath = pathlib.Path(mrmlPath).resolve()
        folder = mrmlPath.parent
        folder.mkdir(parents=True, exist_ok=True)
        used = set()
        nodes = [self.scene.GetNthNodeByClass(i, "vtkMRMLStorableNode")
                 for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLStorableNode"))]
        for node in nodes:
            if not node.GetSaveWithScene() or node.GetHideFromEditors() and not node.IsA("vtkMRMLTableNode"):
                continue
            if node.IsA("vtkMRMLColorTableNode") or node.IsA("vtkMRMLColorNode"):
                continue
            if node.GetStorageNode() is None and not node.AddDefaultStorageNode():
                continue
            storage = node.GetStorageNode()
            stem = _safeFileName(node.GetName())
            while stem in used:
                stem += "_"
            used.add(stem)
            target = folder / f"{stem}.{storage.GetDefaultWriteFileExtension()}"
            storage.SetFileName(str(target))
            if not storage.WriteData(node):
                raise RuntimeError(_("Could not write {name} to {path}.").format(name=node.GetName(), path=target))
        self.scene.SetRootDirectory(str(folder))
        self.scene.SetURL(str(mrmlPath))
        if not self.scene.Commit():
            raise RuntimeError(_("Could not write the scene {path}.").format(path=mrmlPath))
        return mrmlPath

    @staticmethod
    def loadScene(mrmlPath):
        """A new scene read from ``mrmlPath`` (with its data, through the storage nodes) and its logic."""
        scene = slicer.vtkMRMLScene()
        logic = ClinFuseDiffMRMLLogic(scene)
        scene.SetURL(str(pathlib.Path(mrmlPath).resolve()))
        if not scene.Connect():
            raise RuntimeError(_("Could not read the scene {path}.").format(path=mrmlPath))
        return scene, logic


class InferenceJob:
    """One started ``clinfusediff infer``: poll it, cancel it, then :meth:`finish` to get the nodes."""

    def __init__(self, logic: ClinFuseDiffMRMLLogic, process: InferenceProcess, workDir: pathlib.Path,
                 outputDir: pathlib.Path, keepOutput: bool, referenceVolume, segmentationNode=None, tableNode=None):
        self.logic = logic
        self.process = process
        self.workDir = workDir
        self.outputDir = outputDir
        self.keepOutput = keepOutput
        self.referenceVolume = referenceVolume
        self.segmentationNode = segmentationNode
        self.tableNode = tableNode
        self.startTime = time.time()
        self.finished = False

    def poll(self, logCallback=None, progressCallback=None) -> bool:
        """Forward output and progress; True while the subprocess runs."""
        return self.process.poll(logCallback, progressCallback)

    def cancel(self) -> None:
        self.process.cancel()

    @property
    def cancelled(self) -> bool:
        return self.process.cancelled

    def finish(self) -> InferenceResults:
        """Load the results into the scene (after the process has ended) and remove the work folder.

        Raises RuntimeError with the command's error message when it failed or was cancelled; the
        work folder is then kept when the outputs were temporary (its path is logged).
        """
        if self.process.poll():
            raise RuntimeError("the inference is still running; poll() until it returns False")
        self.finished = True
        code = self.process.returncode
        try:
            if self.process.cancelled:
                raise RuntimeError(_("Cancelled by the user."))
            if code != 0:
                raise RuntimeError(errorFromOutput(self.process.lines)
                                   or _("clinfusediff infer failed with exit code {code}.").format(code=code))
            try:
                results = self.logic.importResults(self.outputDir, self.referenceVolume, self.segmentationNode, self.tableNode)
            except Exception as e:
                raise RuntimeError(_("Loading the results failed: {err}").format(err=e)) from e
        except RuntimeError:
            if not self.keepOutput and not self.process.cancelled:
                logging.info(f"ClinFuseDiff: inputs and partial outputs kept for inspection in {self.workDir}")
            else:
                shutil.rmtree(self.workDir, ignore_errors=True)
            raise
        results.seconds = time.time() - self.startTime
        if self.keepOutput:
            results.files = {p.name: p for p in sorted(self.outputDir.iterdir()) if p.is_file()}
        shutil.rmtree(self.workDir, ignore_errors=True)
        return results
