"""ClinFuseDiff in a web browser: Slicer's slice and 3D views (trame-slicer) around the module's Logic.

The page does what the Slicer module does, with the same code: the volumes are read by Slicer's
storage nodes into a ``vtkMRMLScene`` (``slicer-core``), ``ClinFuseDiffLib.logic`` writes them for
``python -m ClinFuseDiffCore.cli infer`` (a cancellable subprocess, as in Slicer) and loads the
``.seg.nrrd`` and ``prediction.json`` back into segmentation and table nodes; trame-slicer renders
the scene headless (EGL) and streams the views as images. Nothing is reimplemented here.

Start: ``scripts/clinfusediff-web [--patient DIR] [--checkpoint best.pt] [--port 8080]``, then open
http://127.0.0.1:8080 . It listens on 127.0.0.1 unless ``--host`` says otherwise and loads nothing
from outside the machine.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import pathlib
import sys
import traceback

MODULE_DIR = pathlib.Path(__file__).resolve().parent.parent  # ClinFuseDiff/ (the Slicer module folder)
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from trame.app import TrameApp  # noqa: E402
from trame.ui.vuetify3 import SinglePageWithDrawerLayout  # noqa: E402
from trame.widgets import html  # noqa: E402
from trame.widgets import vuetify3 as v3  # noqa: E402
from trame_slicer import module as trame_slicer_module  # noqa: E402
from trame_slicer.core import LayoutManager, SlicerApp  # noqa: E402
from trame_slicer.rca_view import register_rca_factories  # noqa: E402

from ClinFuseDiffLib.common import (  # noqa: E402
    DEVICES,
    MODALITIES,
    InferenceSettings,
    matchModalityFiles,
    pathOrNone,
    volumeStem,
)
from ClinFuseDiffLib.logic import ClinFuseDiffMRMLLogic  # noqa: E402

LABELS = {"mri_t1": "T1", "mri_t1ce": "T1ce", "mri_t2": "T2", "mri_flair": "FLAIR", "ct": "CT", "pet": "PET"}
LAYOUT = "Axial Primary"  # axial view large; 3D, coronal and sagittal beside it
POLL_S = 0.2
ICON = MODULE_DIR / "Resources" / "Icons" / "ClinFuseDiff.png"


def _modality_rows(files: dict | None = None) -> list:
    files = files or {}
    return [{"name": name, "label": LABELS[name], "file": str(files.get(name, "")),
             "available": name in files, "use": name in files} for name, _key in MODALITIES]


def _fmt(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def inputFiles(text: str) -> dict:
    """A patient folder, or volume files separated by ';' or new lines -> ``{modality: path}``.

    Raises ValueError naming what was not found or not recognised.
    """
    items = [s.strip() for s in text.replace("\n", ";").split(";") if s.strip()]
    if not items:
        raise ValueError("Give a patient folder or volume files (separated by ';').")
    paths = []
    for item in items:
        p = pathlib.Path(item).expanduser()
        if p.is_dir():
            paths += [q for q in p.iterdir() if q.is_file()]
        elif p.is_file():
            paths.append(p)
        else:
            raise ValueError(f"{p} does not exist.")
    matched = matchModalityFiles(paths)
    if not matched:
        names = ", ".join(sorted(q.name for q in paths if volumeStem(q))) or "no volume files"
        raise ValueError(f"No file name suggests a modality (t1, t1ce, t2, flair, ct, pet): {names}.")
    return matched


class ClinFuseDiffWebApp(TrameApp):
    """The page: inputs on the left, Slicer's views in the middle, results under them."""

    def __init__(self, server=None, patient: str = "", checkpoint: str = "", output: str = ""):
        super().__init__(server)
        self.server.enable_module(trame_slicer_module)
        self.slicer_app = SlicerApp()
        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout_dict(LayoutManager.default_grid_configuration())
        self.mrml = ClinFuseDiffMRMLLogic(self.slicer_app.scene, self.slicer_app.segmentations_logic)
        self.volumes: dict = {}
        self.segmentation = None
        self.table = None
        self.job = None
        self._task = None
        s = self.state
        s.trame__title = "ClinFuseDiff"
        # trame-slicer's default favicon is an outside URL: serve the module's icon inline instead.
        s.trame__favicon = "data:image/png;base64," + base64.b64encode(ICON.read_bytes()).decode() if ICON.is_file() else ""
        s.patient_text = patient
        s.modalities = _modality_rows()
        s.checkpoint = checkpoint
        s.use_ttt = True
        s.ttt_steps = 0
        s.samples = 8
        s.device = "auto"
        s.devices = list(DEVICES)
        s.clinical_values = ""
        s.output_folder = output
        s.running = False
        s.progress = 0
        s.stage = ""
        s.status = "Open a patient folder."
        s.error = ""
        s.log = ""
        s.result_rows = []
        s.prediction_text = ""
        s.missing_text = ""
        s.has_results = False
        s.loaded = False
        self._build_ui()
        self.layout_manager.set_layout(LAYOUT)
        if patient:
            self.load_patient()

    # ------------------------------------------------------------------ actions
    def _fail(self, message: str) -> None:
        self.state.error = message
        self.state.status = "Failed."
        logging.warning(f"ClinFuseDiff web: {message}")

    def load_patient(self) -> None:
        """Read the patient's volumes with Slicer's storage nodes; tick the modalities found."""
        s = self.state
        s.error = ""
        if s.running:
            return self._fail("A run is in progress; cancel it first.")
        try:
            files = inputFiles(s.patient_text or "")
            self.slicer_app.scene.Clear(False)
            self.volumes, self.segmentation, self.table = {}, None, None
            for name, path in files.items():
                self.volumes[name] = self.mrml.readVolume(path, name=f"{LABELS[name]} ({path.name})")
        except Exception as e:
            self.volumes = {}
            s.loaded = False
            s.modalities = _modality_rows()
            return self._fail(str(e))
        s.modalities = _modality_rows(files)
        s.loaded = True
        s.has_results = False
        s.result_rows, s.prediction_text, s.missing_text = [], "", ""
        first = next(iter(self.volumes.values()))
        self.slicer_app.display_manager.show_volume_in_slice_background(first)
        self.slicer_app.display_manager.reset_views()
        s.status = f"Loaded {', '.join(LABELS[n] for n in files)}. Untick what the patient does not have, choose a checkpoint and Run."

    def set_use(self, name: str, value: bool) -> None:
        rows = [dict(r) for r in self.state.modalities]
        for r in rows:
            if r["name"] == name:
                r["use"] = bool(value) and r["available"]
        self.state.modalities = rows

    def settings(self) -> InferenceSettings:
        s = self.state
        values = (s.clinical_values or "").strip()
        return InferenceSettings(checkpoint=pathOrNone(s.checkpoint), useTTT=bool(s.use_ttt),
                                 tttSteps=int(s.ttt_steps or 0), numSamples=int(s.samples or 1),
                                 device=s.device, useClinical=bool(values), clinicalValues=values,
                                 outputFolder=pathOrNone(s.output_folder))

    def run(self) -> None:
        s = self.state
        s.error = ""
        if s.running:
            return
        try:
            chosen = {r["name"]: self.volumes[r["name"]] for r in s.modalities if r["use"] and r["name"] in self.volumes}
            if not self.volumes:
                raise ValueError("Open a patient first.")
            for node in (self.segmentation, self.table):
                if node is not None:
                    self.slicer_app.scene.RemoveNode(node)
            self.segmentation = self.table = None
            self.job = self.mrml.startInference(chosen, self.settings(), pythonExecutable=sys.executable)
        except Exception as e:
            return self._fail(str(e))
        s.running, s.progress, s.stage, s.log, s.has_results = True, 0, "starting", "", False
        s.status = "Running (" + ", ".join(LABELS[n] for n in chosen) + ")..."
        self._task = asyncio.ensure_future(self._poll())

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.state.status = "Cancelling..."

    async def _poll(self) -> None:
        job = self.job
        lines = []

        def progress(percent, stage):
            self.state.progress, self.state.stage = percent, stage

        while True:
            with self.state:
                running = job.poll(lines.append, progress)
                if lines:
                    self.state.log = "\n".join((self.state.log.splitlines() + lines)[-200:])
                    lines.clear()
            if not running:
                break
            await asyncio.sleep(POLL_S)
        with self.state:
            self.state.running = False
            self.job = None
            try:
                results = job.finish()
            except Exception as e:  # the command's own message (bad input, cancelled, ...)
                self._fail(str(e))
                return
            try:
                self._show(results)
            except Exception:
                self._fail("Showing the results failed:\n" + traceback.format_exc(limit=3))

    def _show(self, results) -> None:
        s = self.state
        self.segmentation, self.table = results.segmentationNode, results.tableNode
        rows = self.mrml.tableRows(results.tableNode)
        s.result_rows = [{"section": a, "name": b, "value": _fmt(c), "lower": _fmt(d), "upper": _fmt(e)}
                         for a, b, c, d, e in rows]
        rec = results.record
        pred = rec.get("prediction", {})
        if rec.get("task") == "classification":
            top = pred["predicted_class"]
            lo, hi = (pred.get("probability_interval") or {}).get(top) or (float("nan"), float("nan"))
            s.prediction_text = f"{top}: {pred['probabilities'][top]:.3f} (95% {_fmt(lo)} to {_fmt(hi)})"
        else:
            key = "risk" if rec.get("task") == "survival" else "value"
            lo, hi = pred.get(f"{key}_interval") or (float("nan"), float("nan"))
            s.prediction_text = f"{key}: {_fmt(pred[key])} (95% {_fmt(lo)} to {_fmt(hi)})"
        missing = (rec.get("modalities") or {}).get("missing", [])
        s.missing_text = ", ".join(missing) if missing else "none"
        s.has_results = True
        s.progress = 100
        s.status = f"Done in {results.seconds:.1f} s."
        if self.segmentation is not None:
            display = self.segmentation.GetDisplayNode()
            if display is not None:  # see the anatomy under the fill; the outline stays opaque
                display.SetOpacity2DFill(0.35)
            self.slicer_app.display_manager.set_node_visible_in_group(self.segmentation)
            for view in self.slicer_app.view_manager.get_views():
                view.schedule_render()

    # ------------------------------------------------------------------ page
    def _build_ui(self) -> None:
        with SinglePageWithDrawerLayout(self.server, full_height=True) as layout:
            self.ui = layout
            layout.title.set_text("ClinFuseDiff")
            with layout.toolbar:
                v3.VSpacer()
                html.Div("{{ status }}", classes="text-body-2 mr-4", id="status")
            with layout.drawer as drawer:
                drawer.width = 380
                with v3.VContainer(classes="pa-3"):
                    v3.VTextarea(v_model=("patient_text",), label="Patient folder or files (';'-separated)",
                                 rows=2, auto_grow=True, density="compact", id="patient-input",
                                 hide_details=True)
                    v3.VBtn("Open", click=self.load_patient, disabled=("running",), block=True,
                            classes="my-2", id="open-button")
                    html.Div("Available modalities", classes="text-subtitle-2 mt-2")
                    with html.Div(v_for="m in modalities", key="m.name"):
                        v3.VCheckbox(model_value=("m.use",), label=("m.label + (m.file ? '' : ' (not loaded)')",),
                                     disabled=("!m.available || running",), density="compact", hide_details=True,
                                     update_modelValue=(self.set_use, "[m.name, $event]"),
                                     id=("'use-' + m.name",))
                    v3.VTextField(v_model=("clinical_values",), label="Clinical values (age=63; sex=M)",
                                  density="compact", hide_details=True, classes="mt-2", id="clinical-input")
                    v3.VTextField(v_model=("checkpoint",), label="Checkpoint (.pt)", density="compact",
                                  hide_details=True, classes="mt-3", id="checkpoint-input")
                    with v3.VRow(dense=True, classes="mt-2", align="center"):
                        with v3.VCol(cols=6):
                            v3.VCheckbox(v_model=("use_ttt",), label="Test-time training", density="compact",
                                         hide_details=True, id="ttt-checkbox")
                        with v3.VCol(cols=6):
                            v3.VTextField(v_model_number=("ttt_steps",), type="number", label="TTT steps (0 = default)",
                                          density="compact", hide_details=True, disabled=("!use_ttt",), id="ttt-steps")
                    with v3.VRow(dense=True, classes="mt-2"):
                        with v3.VCol(cols=6):
                            v3.VTextField(v_model_number=("samples",), type="number", label="Samples", density="compact",
                                          hide_details=True, id="samples-input")
                        with v3.VCol(cols=6):
                            v3.VSelect(v_model=("device",), items=("devices",), label="Device", density="compact",
                                       hide_details=True, id="device-select")
                    v3.VTextField(v_model=("output_folder",), label="Keep files in (optional)", density="compact",
                                  hide_details=True, classes="mt-2", id="output-input")
                    with v3.VRow(dense=True, classes="mt-3"):
                        with v3.VCol(cols=6):
                            v3.VBtn("Run", click=self.run, color="primary", block=True,
                                    disabled=("running || !loaded",), id="run-button")
                        with v3.VCol(cols=6):
                            v3.VBtn("Cancel", click=self.cancel, block=True, disabled=("!running",), id="cancel-button")
                    v3.VProgressLinear(model_value=("progress",), height=8, classes="mt-3", color="primary",
                                       id="progress")
                    html.Div("{{ stage }}", classes="text-caption")
                    v3.VAlert(v_if="error", type="error", density="compact", classes="mt-2", id="error",
                              style="white-space: pre-wrap; font-size: 12px;", children=["{{ error }}"])
                    v3.VTextarea(v_model=("log",), label="Log", readonly=True, rows=5, density="compact",
                                 classes="mt-2", style="font-family: monospace; font-size: 11px;", hide_details=True)
            with layout.content:
                with html.Div(style="display: flex; flex-direction: column; height: 100%;"):
                    with html.Div(style="flex: 1 1 65%; min-height: 300px; position: relative;", id="views"):
                        self.layout_manager.initialize_layout_grid(layout)
                    with html.Div(style="flex: 0 0 auto; max-height: 35%; overflow-y: auto;", classes="pa-2",
                                  v_if="has_results", id="results"):
                        html.Div("Prediction: {{ prediction_text }}", classes="text-subtitle-1", id="prediction")
                        html.Div("Missing (imputed): {{ missing_text }}", classes="text-body-2", id="missing")
                        with v3.VTable(density="compact", id="result-table"):
                            with html.Thead():
                                with html.Tr():
                                    for title in ("Section", "Name", "Value", "95% lower", "95% upper"):
                                        html.Th(title)
                            with html.Tbody():
                                with html.Tr(v_for="(r, i) in result_rows", key="i", classes="result-row"):
                                    for key in ("section", "name", "value", "lower", "upper"):
                                        html.Td(f"{{{{ r.{key} }}}}", classes=f"col-{key}")


def main(argv=None) -> None:
    import argparse

    from trame.app import get_server

    parser = argparse.ArgumentParser(prog="clinfusediff-web", description=__doc__.split("\n\n")[0])
    parser.add_argument("--patient", default="", help="patient folder (or ';'-separated volume files) to open")
    parser.add_argument("--checkpoint", default="", help="checkpoint (.pt) to preselect")
    parser.add_argument("--output", default="", help="keep each run's files (prediction.json, ...) here")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="port (0: any free port)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    server = get_server("clinfusediff-web", client_type="vue3")
    app = ClinFuseDiffWebApp(server, patient=args.patient, checkpoint=args.checkpoint, output=args.output)
    app.server.start(host=args.host, port=args.port, open_browser=False, show_connection_info=True)


if __name__ == "__main__":
    main()
