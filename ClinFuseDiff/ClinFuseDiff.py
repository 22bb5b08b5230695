"""ClinFuseDiff: multimodal outcome prediction with uncertainty and a brain segmentation, in 3D Slicer.

The module collects the patient's volumes (one selector per modality), clinical values and a
checkpoint, then runs ``PythonSlicer -m ClinFuseDiffCore.cli infer ...`` in a cancellable
subprocess — the same command as in the shell — and loads what it writes: a ``.seg.nrrd``
segmentation (shown over the input) and ``prediction.json`` (shown as a table).

The MRML work (volume nodes -> files, the command line, the ``.seg.nrrd`` into a segmentation
node, ``prediction.json`` into a table node) lives in the Qt-free ``ClinFuseDiffLib`` package
beside this file, which also runs on ``slicer-core`` (tests, the trame-slicer web app); this file
keeps the Slicer-application glue: parameter node, Widget, PythonSlicer, QTimer, layout,
dependency installation and the self-test.

Nothing here imports torch or ClinFuseDiffCore at module load; torch is installed through the
PyTorch extension (PyTorchUtils) and the other packages from ``Resources/requirements.txt``, both
only on first use and after asking.
"""

import logging
import os
import pathlib
import re
import shutil
import tempfile
import time
from enum import Enum
from typing import Annotated, Callable, Optional

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# The Qt-free part of the module (MRML work, the command, its output), shared with the web app.
from ClinFuseDiffLib.common import (  # noqa: F401  (re-exported for scripts and the self-test)
    MODALITIES,
    InferenceSettings,
    corePythonPath,
    matchModalityName,
    parseClinicalValues,
    parseProgressLine,
    predictionTableRows,
    tinyTrainArguments,
)
from ClinFuseDiffLib.common import pathOrNone as _pathOrNone
from ClinFuseDiffLib.common import useFlagName as _useFlagName
from ClinFuseDiffLib.logic import ClinFuseDiffMRMLLogic

# Low-memory warning threshold for the GPU, in GiB.
LOW_GPU_MEMORY_GB = 7.0


#
# ClinFuseDiff
#


class ClinFuseDiff(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("ClinFuseDiff")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["ClinFuseDiff developers"]
        self.parent.helpText = _("""
Predicts a clinical outcome (class probabilities, risk or a value) with its uncertainty from
whatever the patient has of MRI (T1, T1ce, T2, FLAIR), CT, PET and clinical values, and segments
the brain. Missing modalities are imputed in feature space by a conditional diffusion model; the
model adapts to the patient at test time. Pick the volumes, tick the available modalities, choose
a checkpoint and click Apply.
See <a href="https://github.com/ClinFuseDiff/ClinFuseDiff#readme">the documentation</a>.
Research use only: not a medical device.
""")
        self.parent.acknowledgementText = _("""
Built on 3D Slicer's scripted module template, the PyTorch extension (PyTorchUtils), MONAI and
slicerio; the subprocess handling follows SlicerTotalSegmentator and SlicerMONAIAuto3DSeg.
""")


#
# ClinFuseDiffParameterNode
#


class ComputeDevice(Enum):
    """Where the subprocess runs the model."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"

    @staticmethod
    def label(value):
        return {"auto": _("auto (GPU if available)"), "cpu": _("CPU"), "cuda": _("GPU (CUDA)")}[value.value]


@parameterNodeWrapper
class ClinFuseDiffParameterNode:
    """
    The parameters needed by the module (saved with the scene).

    t1Volume ... petVolume - one input volume per image modality (None = not available).
    useT1 ... usePet, useClinical - which modalities the patient has.
    clinicalCsvPath, clinicalPatientId - a CSV file (patient_id column) and the row to use.
    clinicalValues - or values typed in, "name=value; name=value".
    checkpointPath - the trained ClinFuseDiff checkpoint.
    useTTT, tttSteps - test-time training on/off and its steps (0 = checkpoint default).
    numSamples - number of diffusion samples K (uncertainty).
    device - auto / CPU / GPU.
    outputSegmentation, outputTable - result nodes (created when None).
    outputFolder - where to keep the written files (empty = temporary folder).
    """

    t1Volume: Optional[slicer.vtkMRMLScalarVolumeNode]
    t1ceVolume: Optional[slicer.vtkMRMLScalarVolumeNode]
    t2Volume: Optional[slicer.vtkMRMLScalarVolumeNode]
    flairVolume: Optional[slicer.vtkMRMLScalarVolumeNode]
    ctVolume: Optional[slicer.vtkMRMLScalarVolumeNode]
    petVolume: Optional[slicer.vtkMRMLScalarVolumeNode]
    useT1: bool = False
    useT1ce: bool = False
    useT2: bool = False
    useFlair: bool = False
    useCt: bool = False
    usePet: bool = False
    useClinical: bool = False
    clinicalCsvPath: pathlib.Path
    clinicalPatientId: str = ""
    clinicalValues: str = ""
    checkpointPath: pathlib.Path
    useTTT: bool = True
    tttSteps: Annotated[int, WithinRange(0, 1000)] = 0
    numSamples: Annotated[int, WithinRange(1, 128)] = 8
    device: ComputeDevice = ComputeDevice.auto
    outputSegmentation: Optional[slicer.vtkMRMLSegmentationNode]
    outputTable: Optional[slicer.vtkMRMLTableNode]
    outputFolder: pathlib.Path


# ClinFuseDiffWidget
#


class ClinFuseDiffWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ClinFuseDiff.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = ClinFuseDiffLogic()
        self.ui.progressBar.setVisible(False)

        # Connections
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.matchVolumesButton.connect("clicked(bool)", self.onMatchVolumes)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateDeviceInfo)
        for _name, key in MODALITIES:
            # nodeActivated: only a choice the user makes in the selector (not the scene or the
            # parameter node restoring it) ticks or unticks the modality.
            getattr(self.ui, f"{key}VolumeSelector").connect(
                "nodeActivated(vtkMRMLNode*)", lambda node, k=key: self.onVolumeSelected(k, node))

        self.initializeParameterNode()
        qt.QTimer.singleShot(0, self.updateDeviceInfo)

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self.logic and self.logic.isRunning():
            self.logic.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAdded(self, caller, event, calldata) -> None:
        # A volume loaded after the module opened fills an empty selector whose name it matches.
        if self._parameterNode and isinstance(calldata, slicer.vtkMRMLScalarVolumeNode):
            qt.QTimer.singleShot(0, lambda: self.logic.fillVolumesByName(self._parameterNode, overwrite=False))

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        self.logic.fillVolumesByName(self._parameterNode, overwrite=False)

    def setParameterNode(self, inputParameterNode: Optional[ClinFuseDiffParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # ui element that needs connection to the parameter node has a SlicerParameterName
            # property; this binds them both ways.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def onVolumeSelected(self, key: str, node) -> None:
        if self._parameterNode:
            setattr(self._parameterNode, _useFlagName(key), node is not None)

    def onMatchVolumes(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to match volumes."), waitCursor=True):
            matched = self.logic.fillVolumesByName(self._parameterNode, overwrite=True)
            self.ui.statusLabel.text = _("Matched: {names}").format(
                names=", ".join(f"{k}={n.GetName()}" for k, n in matched.items()) or _("none"))

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self.logic.isRunning():
            self.ui.applyButton.enabled = True
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the running inference.")
            return
        self.ui.applyButton.text = _("Apply")
        problem = self.logic.inputProblem(self._parameterNode) if self._parameterNode else _("No parameter node.")
        self.ui.applyButton.enabled = problem is None
        self.ui.applyButton.toolTip = problem or _("Run the inference on the selected inputs.")

    def updateDeviceInfo(self, _index=None) -> None:
        info = self.logic.detectDevice()
        choice = self._parameterNode.device if self._parameterNode else ComputeDevice.auto
        if info["torch"] is None:
            text = _("GPU: unknown until PyTorch is installed (it is installed on first Apply, after asking).")
            color = "gray"
        elif not info["cuda"]:
            text = _("No CUDA GPU visible to PyTorch: inference runs on the CPU (slower).")
            color = "red" if choice == ComputeDevice.cuda else "gray"
        else:
            text = _("GPU: {name}, {mem:.1f} GB").format(name=info["name"], mem=info["memoryGB"])
            color = "green"
            if info["memoryGB"] < LOW_GPU_MEMORY_GB and choice != ComputeDevice.cpu:
                text += " — " + _("less than {lim:.0f} GB: large volumes may run out of memory; choose CPU if it fails.").format(lim=LOW_GPU_MEMORY_GB)
                color = "darkorange"
        self.ui.deviceInfoLabel.text = text
        self.ui.deviceInfoLabel.setStyleSheet(f"color: {color}")

    def addLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)
        self.ui.logTextEdit.ensureCursorVisible()

    def setProgress(self, percent: int, message: str) -> None:
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.value = percent
        if message:
            self.ui.statusLabel.text = message

    def onApplyButton(self) -> None:
        if self.logic.isRunning():
            self.logic.cancel()
            self.addLog(_("Cancel requested."))
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start ClinFuseDiff."), waitCursor=True):
            self.ui.logTextEdit.clear()
            self.setProgress(0, _("Checking Python packages..."))
            self.logic.setupPythonRequirements(askConfirmation=True)
            self.logic.process(
                self._parameterNode,
                waitForCompletion=False,
                logCallback=self.addLog,
                progressCallback=self.setProgress,
                completedCallback=self.onProcessCompleted,
            )
        self._checkCanApply()

    def onProcessCompleted(self, returnCode: int, errorMessage: Optional[str]) -> None:
        self.ui.progressBar.setVisible(returnCode == 0)
        if returnCode == 0:
            self.setProgress(100, _("Done."))
        elif self.logic.wasCancelled:
            self.ui.statusLabel.text = _("Cancelled.")
        else:
            self.ui.statusLabel.text = _("Failed (exit code {code}); see the log.").format(code=returnCode)
            if errorMessage:
                slicer.util.errorDisplay(_("ClinFuseDiff failed."), detailedText=errorMessage)
        self._checkCanApply()


#
# ClinFuseDiffLogic
#


class ClinFuseDiffLogic(ScriptedLoadableModuleLogic):
    """The module's Logic: parameter node, Slicer-application glue, and the MRML work of
    ``ClinFuseDiffLib.logic.ClinFuseDiffMRMLLogic`` (Qt-free, shared with the web app) on
    ``slicer.mrmlScene``. Usable without the Widget (from the Python console or a script).

    Example::

        logic = ClinFuseDiffLogic()
        p = logic.getParameterNode()
        p.t1Volume = slicer.util.getNode("t1"); p.useT1 = True
        p.checkpointPath = pathlib.Path("/path/model.pt")
        logic.setupPythonRequirements()
        logic.process(p)   # blocks; fills p.outputSegmentation and p.outputTable
    """

    # How often (ms) the running subprocess is polled for output.
    POLL_INTERVAL_MS = 200

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._mrmlLogic = None
        self._timer = None
        self._job = None
        self._jobInfo = None
        self._lastJob = None
        self.wasCancelled = False

    def getParameterNode(self):
        return ClinFuseDiffParameterNode(super().getParameterNode())

    @property
    def mrmlLogic(self) -> ClinFuseDiffMRMLLogic:
        """The Qt-free MRML logic on Slicer's scene, with Slicer's own segmentations logic."""
        if self._mrmlLogic is None or self._mrmlLogic.scene is not slicer.mrmlScene:
            self._mrmlLogic = ClinFuseDiffMRMLLogic(slicer.mrmlScene, slicer.modules.segmentations.logic())
        return self._mrmlLogic

    # ------------------------------------------------------------------ environment
    @staticmethod
    def moduleDir() -> pathlib.Path:
        return pathlib.Path(__file__).resolve().parent

    @classmethod
    def corePythonPath(cls) -> pathlib.Path:
        """The folder that holds the ClinFuseDiffCore package (beside the module or its parent)."""
        return corePythonPath(cls.moduleDir())

    @classmethod
    def subprocessEnvironment(cls) -> dict:
        """Variables added to Slicer's startup environment for the PythonSlicer subprocess.

        ``PYTHONPATH`` gets the folder holding ClinFuseDiffCore first (needed when the module runs
        from a source tree; harmless when installed, where qt-scripted-modules is on the path).
        """
        startup = slicer.util.startupEnvironment().get("PYTHONPATH", "")
        return {"PYTHONPATH": os.pathsep.join(p for p in (str(cls.corePythonPath()), startup) if p),
                "PYTHONUNBUFFERED": "1"}

    @staticmethod
    def pythonSlicerExecutable() -> str:
        exe = shutil.which("PythonSlicer")
        if not exe:
            raise RuntimeError(_("The PythonSlicer executable was not found on PATH; run this inside 3D Slicer."))
        return exe

    @staticmethod
    def launchProcess(cmd: list, environment: dict):
        """Start a subprocess in Slicer's startup environment (not Slicer's own, modified one)."""
        return slicer.util.launchConsoleProcess(cmd, updateEnvironment=environment)

    def setupPythonRequirements(self, askConfirmation: bool = True) -> None:
        """Install torch (through the PyTorch extension) and the packages of requirements.txt, if missing.

        Nothing is installed without asking when ``askConfirmation`` is True. Raises if the user
        declines or the PyTorch extension is missing.
        """
        try:
            import PyTorchUtils  # from the PyTorch extension (EXTENSION_DEPENDS PyTorch)
        except ModuleNotFoundError as e:
            raise RuntimeError(_("This module needs the 'PyTorch' extension. Install it from the Extensions Manager and restart Slicer.")) from e
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            logging.info("ClinFuseDiff: PyTorch is not installed; asking to install it.")
            torch = torchLogic.installTorch(askConfirmation=askConfirmation, torchVersionRequirement=">=2.4")
            if torch is None:
                raise RuntimeError(_("PyTorch is required. Install it with the PyTorch Utils module and try again."))

        requirementsPath = self.moduleDir() / "Resources" / "requirements.txt"
        pydeps = self._packagingModule()
        if pydeps is not None:  # Slicer 5.12+: check, ask, install, offer a restart
            import inspect

            kwargs = {"requester": "ClinFuseDiff"}
            if "prompt_install" in inspect.signature(pydeps.pip_ensure).parameters:
                kwargs["prompt_install"] = askConfirmation
            pydeps.pip_ensure(pydeps.load_requirements(requirementsPath), **kwargs)
            return
        # Older Slicer: check by distribution name, ask, then slicer.util.pip_install.
        missing = self.missingRequirements(requirementsPath)
        if not missing:
            return
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("ClinFuseDiff needs these Python packages, which will be downloaded and installed now:\n{pkgs}").format(pkgs="\n".join(missing)),
                windowTitle=_("Install Python packages")):
            raise RuntimeError(_("Installation of the required Python packages was declined."))
        slicer.util.pip_install(missing)

    @staticmethod
    def _packagingModule():
        """Slicer's packaging helpers (``pip_ensure``/``load_requirements``) where this Slicer has them."""
        import importlib

        for name in ("slicer.packaging", "slicer.pydeps"):
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            if hasattr(module, "pip_ensure") and hasattr(module, "load_requirements"):
                return module
        return None

    @staticmethod
    def missingRequirements(requirementsPath) -> list:
        """Lines of requirements.txt whose distribution is not installed or has another version."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            from packaging.requirements import Requirement
        except ImportError:
            Requirement = None
        missing = []
        for line in pathlib.Path(requirementsPath).read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            distName = re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0]
            try:
                installed = version(distName)
            except PackageNotFoundError:
                missing.append(line)
                continue
            if Requirement is not None and installed not in Requirement(line).specifier:
                missing.append(line)
        return missing

    def detectDevice(self) -> dict:
        """``{"torch": version or None, "cuda": bool, "name": str, "memoryGB": float}``.

        torch is imported only if it is already installed; nothing is installed here.
        """
        import importlib.util

        info = {"torch": None, "cuda": False, "name": "", "memoryGB": 0.0}
        if importlib.util.find_spec("torch") is None:
            return info
        try:
            import torch
        except Exception as e:  # a broken install must not break the GUI
            logging.warning(f"ClinFuseDiff: torch is installed but fails to import: {e}")
            return info
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(cuda=True, name=props.name, memoryGB=props.total_memory / 1024**3)
        return info

    # ------------------------------------------------------------------ inputs
    def fillVolumesByName(self, parameterNode, overwrite: bool = False) -> dict:
        """Select, for each empty (or every, if ``overwrite``) selector, a volume whose name matches."""
        matched = {}
        if parameterNode is None:
            return matched
        for key, node in self.mrmlLogic.matchVolumesByName().items():
            if overwrite or getattr(parameterNode, f"{key}Volume") is None:
                setattr(parameterNode, f"{key}Volume", node)
                setattr(parameterNode, _useFlagName(key), True)
                matched[key] = node
        return matched

    def selectedVolumes(self, parameterNode) -> dict:
        """``{ClinFuseDiffCore modality name: volume node}`` of the ticked, selected modalities."""
        volumes = {}
        for name, key in MODALITIES:
            node = getattr(parameterNode, f"{key}Volume")
            if getattr(parameterNode, _useFlagName(key)) and node is not None:
                volumes[name] = node
        return volumes

    @staticmethod
    def settings(parameterNode) -> InferenceSettings:
        """The parameter node's choices as the settings the shared logic and the command take."""
        return InferenceSettings(
            checkpoint=_pathOrNone(parameterNode.checkpointPath), useTTT=parameterNode.useTTT,
            tttSteps=parameterNode.tttSteps, numSamples=parameterNode.numSamples,
            device=parameterNode.device.value, useClinical=parameterNode.useClinical,
            clinicalCsv=_pathOrNone(parameterNode.clinicalCsvPath),
            clinicalPatientId=parameterNode.clinicalPatientId, clinicalValues=parameterNode.clinicalValues,
            outputFolder=_pathOrNone(parameterNode.outputFolder))

    def inputProblem(self, parameterNode) -> Optional[str]:
        """Why Apply cannot run yet (a sentence for the tooltip), or None when it can."""
        for name, key in MODALITIES:
            if getattr(parameterNode, _useFlagName(key)) and getattr(parameterNode, f"{key}Volume") is None:
                return _("{mod} is ticked but no volume is selected.").format(mod=name)
        if not self.selectedVolumes(parameterNode):
            return _("Select and tick at least one image volume.")
        return self.settings(parameterNode).problem()

    # ------------------------------------------------------------------ running
    def isRunning(self) -> bool:
        return self._job is not None

    def process(self, parameterNode, waitForCompletion: bool = True,
                logCallback: Optional[Callable[[str], None]] = None,
                progressCallback: Optional[Callable[[int, str], None]] = None,
                completedCallback: Optional[Callable[[int, Optional[str]], None]] = None) -> None:
        """Run ``clinfusediff infer`` on the parameter node's inputs and load its results.

        Args:
            parameterNode: a ClinFuseDiffParameterNode.
            waitForCompletion: block until done (scripts, tests) or return at once and poll
                with a QTimer (GUI); cancel with :meth:`cancel`.
            logCallback: receives each output line of the subprocess.
            progressCallback: receives (percent, message) from its PROGRESS lines.
            completedCallback: receives (return code, error text or None) after the results were
                loaded (or loading failed).
        Raises (blocking mode): RuntimeError with the command's error output if it fails.
        """
        if self.isRunning():
            raise RuntimeError(_("An inference is already running; cancel it first."))
        problem = self.inputProblem(parameterNode)
        if problem:
            raise ValueError(problem)
        self.wasCancelled = False
        self._job = self.mrmlLogic.startInference(
            self.selectedVolumes(parameterNode), self.settings(parameterNode),
            pythonExecutable=self.pythonSlicerExecutable(), environment=self.subprocessEnvironment(),
            launcher=self.launchProcess, workDir=slicer.app.temporaryPath,
            segmentationNode=parameterNode.outputSegmentation, tableNode=parameterNode.outputTable)
        self._jobInfo = dict(parameterNode=parameterNode, logCallback=logCallback,
                             progressCallback=progressCallback, completedCallback=completedCallback)
        if waitForCompletion:
            while self._poll():
                slicer.app.processEvents()
                time.sleep(self.POLL_INTERVAL_MS / 1000.0)
            job = self._lastJob
            if job["returnCode"] != 0:
                raise RuntimeError(job["error"] or _("clinfusediff infer failed with exit code {code}.").format(code=job["returnCode"]))
        else:
            self._timer = qt.QTimer()
            self._timer.setInterval(self.POLL_INTERVAL_MS)
            self._timer.timeout.connect(self._poll)
            self._timer.start()

    def _poll(self) -> bool:
        """Forward output and progress; when the process has ended, load the results. True while running."""
        info = self._jobInfo
        if self._job.poll(info["logCallback"] or logging.info, info["progressCallback"]):
            return True
        self._finish()
        return False

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        job, info = self._job, self._jobInfo
        self._job = self._jobInfo = None
        self.wasCancelled = job.cancelled
        returnCode, error = 0, None
        try:
            results = job.finish()
            p = info["parameterNode"]
            p.outputSegmentation = results.segmentationNode
            p.outputTable = results.tableNode
            self.showResults(job.referenceVolume, results.segmentationNode, results.tableNode)
            message = _("Finished in {s:.1f} s.").format(s=results.seconds)
            if results.files:
                message += " " + _("Files (prediction.json, segmentation, report.png): {out}").format(out=results.outputDir)
            (info["logCallback"] or logging.info)(message)
        except RuntimeError as e:
            returnCode = job.process.returncode or 1
            error = str(e)
        self._lastJob = dict(returnCode=returnCode, error=error, lines=job.process.lines)
        if info["completedCallback"]:
            info["completedCallback"](returnCode, error)

    def cancel(self) -> None:
        """Stop the running subprocess and its children (PythonSlicer is a launcher)."""
        if self._job is not None:
            self.wasCancelled = True
            self._job.cancel()

    # ------------------------------------------------------------------ results
    def importResults(self, outputDir, referenceVolume, parameterNode) -> None:
        """Load ``*.seg.nrrd`` and ``prediction.json`` of ``outputDir`` into the parameter node's outputs."""
        results = self.mrmlLogic.importResults(outputDir, referenceVolume, parameterNode.outputSegmentation,
                                               parameterNode.outputTable)
        parameterNode.outputSegmentation = results.segmentationNode
        parameterNode.outputTable = results.tableNode
        self.showResults(referenceVolume, results.segmentationNode, results.tableNode)

    @staticmethod
    def showResults(referenceVolume, segmentationNode, tableNode) -> None:
        if not slicer.app.layoutManager():  # no main window (testing)
            return
        slicer.util.setSliceViewerLayers(background=referenceVolume, fit=True)
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(tableNode.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()
    # ------------------------------------------------------------------ self-test helper
    def trainTinyCheckpoint(self, folder, logCallback: Optional[Callable[[str], None]] = None) -> pathlib.Path:
        """Train a tiny checkpoint on a tiny synthetic cohort in a PythonSlicer subprocess (CPU, ~1 min).

        Used by the self-test; calls ``clinfusediff train`` with the demo config shrunk.
        """
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [self.pythonSlicerExecutable(), "-m", "ClinFuseDiffCore.cli", *tinyTrainArguments(folder)]
        env = {**self.subprocessEnvironment(), "CUDA_VISIBLE_DEVICES": "-1"}
        proc = slicer.util.launchConsoleProcess(cmd, updateEnvironment=env)
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip())
            (logCallback or logging.info)(line.rstrip())
        proc.wait()
        if proc.returncode != 0:
            raise RuntimeError("training the test checkpoint failed:\n" + "\n".join(lines[-20:]))
        found = sorted(folder.rglob("*.pt"))
        if not found:
            raise RuntimeError(f"training wrote no .pt checkpoint under {folder}")
        best = [ckpt for ckpt in found if ckpt.name in ("best.pt", "model.pt")]
        return (best or found)[-1]


#
# ClinFuseDiffTest
#


class ClinFuseDiffTest(ScriptedLoadableModuleTest):
    """Self-test: synthetic volumes in the scene -> tiny checkpoint -> Logic on CPU -> nodes checked.

    Run inside Slicer (Developer mode: Reload and Test), or:
    Slicer --no-main-window --testing --additional-module-paths <repo>/ClinFuseDiff --python-code
      "import slicer.testing; slicer.testing.runUnitTest(['<repo>/ClinFuseDiff'], 'ClinFuseDiff')"
    Needs torch (PyTorch extension) and the requirements already installed.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_NameMatching()
        self.setUp()
        self.test_BadInputsRejected()
        self.setUp()
        self.test_InferenceOnSyntheticVolumes()

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _syntheticVolumes():
        """Two volumes (T1-like, FLAIR-like) of a bright ellipsoid 'brain', oblique LPS-like geometry."""
        import numpy as np

        shape_kji = (40, 48, 44)
        k, j, i = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape_kji], indexing="ij")
        brain = (i / 0.75) ** 2 + (j / 0.8) ** 2 + (k / 0.7) ** 2 < 1.0
        lesion = (i - 0.3) ** 2 + (j + 0.1) ** 2 + k**2 < 0.06
        rng = np.random.default_rng(0)
        t1 = (brain * 600.0 - lesion * 200.0 + rng.normal(0, 15, shape_kji)).astype(np.float32)
        flair = (brain * 400.0 + lesion * 500.0 + rng.normal(0, 15, shape_kji)).astype(np.float32)
        theta = np.deg2rad(12.0)
        rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
        ijkToRas = np.eye(4)
        ijkToRas[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rot @ np.diag([2.0, 2.0, 2.5])
        ijkToRas[:3, 3] = [40.0, 50.0, -45.0]
        nodes = {}
        for name, arr in (("case1_t1", t1), ("case1_flair", flair)):
            node = slicer.util.addVolumeFromArray(arr, ijkToRAS=ijkToRas, name=name)
            nodes[name] = node
        return nodes, brain

    # ---------------------------------------------------------------- tests
    def test_NameMatching(self):
        self.delayDisplay("Volume name matching")
        cases = {"BraTS2021_00001_t1ce": "t1ce", "BraTS2021_00001_t1": "t1", "sub-01_T2w": "t2",
                 "T2-FLAIR axial": "flair", "CT head": "ct", "FDG PET": "pet", "Segmentation": None}
        for name, expected in cases.items():
            self.assertEqual(matchModalityName(name), expected, name)
        nodes, _brain = self._syntheticVolumes()
        logic = ClinFuseDiffLogic()
        p = logic.getParameterNode()
        matched = logic.fillVolumesByName(p, overwrite=True)
        self.assertEqual(set(matched), {"t1", "flair"})
        self.assertTrue(p.useT1 and p.useFlair and not p.useCt)
        self.assertEqual(set(logic.selectedVolumes(p)), {"mri_t1", "mri_flair"})

    def test_BadInputsRejected(self):
        self.delayDisplay("Bad inputs are rejected with a clear message")
        nodes, _brain = self._syntheticVolumes()
        logic = ClinFuseDiffLogic()
        p = logic.getParameterNode()
        logic.fillVolumesByName(p, overwrite=True)
        p.checkpointPath = pathlib.Path(slicer.app.temporaryPath) / "does-not-exist.pt"
        self.assertIn("does not exist", logic.inputProblem(p))
        with self.assertRaises(ValueError):
            logic.process(p)
        p.useClinical = True
        p.clinicalValues = "age 63"
        with self.assertRaises(ValueError):
            parseClinicalValues(p.clinicalValues)

    def test_InferenceOnSyntheticVolumes(self):
        import numpy as np

        self.delayDisplay("Training a tiny checkpoint (CPU, about a minute)")
        nodes, brain = self._syntheticVolumes()
        logic = ClinFuseDiffLogic()
        workDir = pathlib.Path(tempfile.mkdtemp(prefix="ClinFuseDiffTest-", dir=slicer.app.temporaryPath))
        checkpoint = logic.trainTinyCheckpoint(workDir / "train")

        self.delayDisplay("Running inference with the Logic on CPU")
        p = logic.getParameterNode()
        logic.fillVolumesByName(p, overwrite=True)
        p.checkpointPath = checkpoint
        p.device = ComputeDevice.cpu
        p.numSamples = 4
        p.useTTT = True
        p.tttSteps = 2
        p.outputFolder = workDir / "out"
        progress = []
        logic.process(p, waitForCompletion=True, progressCallback=lambda pc, msg: progress.append(pc))
        self.assertTrue(progress and progress[-1] == 100, f"progress reports: {progress}")

        # Output files
        for name in ("prediction.json", "report.png"):
            self.assertTrue((workDir / "out" / name).exists(), name)

        # Segmentation: on the reference geometry, named segments, overlapping the synthetic brain.
        segNode = p.outputSegmentation
        self.assertIsNotNone(segNode)
        segmentation = segNode.GetSegmentation()
        self.assertGreaterEqual(segmentation.GetNumberOfSegments(), 1)
        segmentId = segmentation.GetSegmentIdBySegmentName("brain")
        self.assertTrue(segmentId, "no segment named 'brain'")
        reference = nodes["case1_t1"]
        mask = logic.mrmlLogic.segmentArray(segNode, "brain", reference)  # Slicer's export onto the input grid
        self.assertEqual(mask.shape, slicer.util.arrayFromVolume(reference).shape)
        inter = np.logical_and(mask > 0, brain).sum()
        dice = 2.0 * inter / max(1, (mask > 0).sum() + brain.sum())
        self.assertGreater(dice, 0.6, f"brain mask does not line up with the input (Dice {dice:.2f})")

        # Table: probabilities sum to 1, uncertainty present, contributions only for used modalities.
        table = p.outputTable
        self.assertIsNotNone(table)
        sections = [table.GetCellText(r, 0) for r in range(table.GetNumberOfRows())]
        names = [table.GetCellText(r, 1) for r in range(table.GetNumberOfRows())]
        values = [float(table.GetCellText(r, 2)) for r in range(table.GetNumberOfRows())]
        probs = [v for s, v in zip(sections, values) if s == "probability"]
        self.assertGreaterEqual(len(probs), 2)
        self.assertAlmostEqual(sum(probs), 1.0, places=3)
        self.assertIn("prediction", sections)
        unc = {n: v for s, n, v in zip(sections, names, values) if s == "uncertainty"}
        self.assertEqual(set(unc), {"std", "entropy", "mutual_information"})
        self.assertTrue(all(np.isfinite(v) and v >= 0 for v in unc.values()), unc)
        contributed = {n for s, n in zip(sections, names) if s == "contribution"}
        self.assertTrue(contributed and contributed <= {"mri_t1", "mri_flair"}, contributed)
        self.assertIn("ct", {n for s, n in zip(sections, names) if s == "missing"})
        shutil.rmtree(workDir, ignore_errors=True)
        self.delayDisplay("Test passed")
