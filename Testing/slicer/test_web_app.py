"""The trame-slicer web app (ClinFuseDiff/ClinFuseDiffWeb) driven in a real browser by Playwright.

The app runs as its user starts it (``python -m ClinFuseDiffWeb``, headless rendering, 127.0.0.1);
Debian's chromium (headless) opens the page, loads a synthetic patient, unticks a modality, runs
the real inference subprocess on a tiny checkpoint and checks the table against prediction.json
and that the segmentation overlay appears in Slicer's slice view. Screenshots go to
``$CLINFUSEDIFF_SCREENSHOTS`` when set (the README's come from there). Skipped, with the reason,
where trame-slicer, playwright or chromium is missing (``scripts/install_web.sh`` installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("trame_slicer", reason="trame-slicer is not installed (scripts/install_web.sh installs it)")
pytest.importorskip("slicer", reason="slicer-core is not installed (scripts/install_web.sh installs it)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (scripts/install_web.sh)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (scripts/install_web.sh installs Debian's chromium)", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ClinFuseDiff"))
sys.path.insert(0, str(REPO / "Testing"))
from ClinFuseDiffLib.common import predictionTableRows  # noqa: E402
from test_inference import write_checkpoint  # noqa: E402

from ClinFuseDiffCore.data.synth.cohort import generate_cohort  # noqa: E402

pytestmark = pytest.mark.slow
RUN_TIMEOUT_MS = 240_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    ckpt = root / "best.pt"
    write_checkpoint(ckpt)  # mri_t1, mri_t2, ct, clinical
    cohort = Path(generate_cohort(root / "cohort", 1, shape=(40, 40, 32), seed=3, progress=False)["patient_dirs"][0])
    good = root / "good"
    good.mkdir()
    for m in ("mri_t1", "mri_t2", "ct"):
        shutil.copy(cohort / f"{m}.nii.gz", good / f"{m}.nii.gz")
    far = root / "far"  # a T2 that does not overlap the T1
    far.mkdir()
    shutil.copy(cohort / "mri_t1.nii.gz", far / "mri_t1.nii.gz")
    img = nib.load(cohort / "mri_t2.nii.gz")
    aff = img.affine.copy()
    aff[:3, 3] += 700.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff, img.header), far / "mri_t2.nii.gz")
    pet = root / "pet"  # a modality the checkpoint was not trained with
    pet.mkdir()
    shutil.copy(cohort / "mri_t1.nii.gz", pet / "mri_t1.nii.gz")
    shutil.copy(cohort / "pet.nii.gz", pet / "pet.nii.gz")
    return dict(root=root, ckpt=ckpt, good=good, far=far, pet=pet, cohort=cohort)


@pytest.fixture(scope="module")
def server(data):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "ClinFuseDiff"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log = open(data["root"] / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "ClinFuseDiffWeb", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, cwd=str(data["root"]))
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                log.close()
                pytest.fail("the web app did not start:\n" + (data["root"] / "server.log").read_text()[-3000:])
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--use-gl=swiftshader"])
        yield b
        b.close()


@pytest.fixture()
def page(browser, server):
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    outside = []

    def route(r):  # the page must load nothing from outside this machine
        host = r.request.url.split("/")[2] if "://" in r.request.url else ""
        if r.request.url.startswith(("data:", "blob:")) or host.startswith(("127.0.0.1", "localhost")):
            return r.continue_()
        outside.append(r.request.url)
        return r.abort()

    ctx.route("**/*", route)
    pg = ctx.new_page()
    pg.goto(server)
    pg.wait_for_selector("#open-button", timeout=60_000)
    yield pg
    ctx.close()
    assert not outside, f"the page requested outside URLs: {outside}"


def _shots() -> Path | None:
    d = os.environ.get("CLINFUSEDIFF_SCREENSHOTS")
    if not d:
        return None
    Path(d).mkdir(parents=True, exist_ok=True)
    return Path(d)


def _open(page, folder: Path) -> None:
    page.fill("#patient-input", str(folder))
    page.click("#open-button")
    page.wait_for_function("document.querySelector('#status').innerText.startsWith('Loaded')", timeout=60_000)


def _tinted_pixels(png: bytes, rgb, min_tint=3.0) -> int:
    """Pixels tinted towards the segment colour: the grey volume has R = G = B, the segmentation
    (filled at half opacity, outlined in full) adds the segment's chroma."""
    import io

    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(float)
    chroma = np.array(rgb, float) - np.mean(rgb)  # the segment colour minus its grey
    assert np.abs(chroma).max() > 5, f"segment colour {rgb} is grey: the check could not see it"
    direction = chroma / np.linalg.norm(chroma)
    tint = (a - a.mean(-1, keepdims=True)) @ direction  # (H, W) chroma along the segment's
    return int((tint > min_tint).sum())


def _axial_view(page):
    """The largest streamed view image (the axial view of the 'Axial Primary' layout)."""
    boxes = []
    for el in page.locator("#views img, #views canvas").all():
        b = el.bounding_box()
        if b and b["width"] > 50:
            boxes.append((b["width"] * b["height"], el))
    assert boxes, "no streamed view in the page"
    return max(boxes, key=lambda t: t[0])[1]


def test_run_a_patient_in_the_browser(page, data):
    import slicerio

    out = data["root"] / "out"
    _open(page, data["good"])
    for m in ("mri_t1", "mri_t2", "ct"):
        assert page.locator(f"#use-{m}").is_checked(), m  # auto-detected from the file names
    assert not page.locator("#use-pet").is_checked() and page.locator("#use-pet").is_disabled()
    page.locator("#use-ct").uncheck(force=True)  # the patient "has no CT": the model imputes it
    page.fill("#checkpoint-input", str(data["ckpt"]))
    page.fill("#samples-input", "3")
    page.fill("#ttt-steps", "2")
    page.fill("#clinical-input", "age=61; sex=F")
    page.fill("#output-input", str(out))
    time.sleep(3)  # let the view stream the loaded volume
    before = _axial_view(page).screenshot()
    page.click("#run-button")
    page.wait_for_selector("#prediction", timeout=RUN_TIMEOUT_MS)
    assert page.locator("#error").count() == 0

    rec = json.loads((out / "prediction.json").read_text(encoding="utf-8"))
    assert rec["modalities"]["missing"] == ["ct"] and rec["modalities"]["used"] == ["mri_t1", "mri_t2", "clinical"]
    cells = page.locator(".result-row").evaluate_all(
        "rows => rows.map(r => Array.from(r.querySelectorAll('td')).map(td => td.innerText.trim()))")
    expected = predictionTableRows(rec)
    assert len(cells) == len(expected)
    for got, (section, name, value, lo, hi) in zip(cells, expected):
        assert got[:2] == [section, name]
        for text, bound in zip(got[2:], (value, lo, hi)):  # 4 significant digits; NaN shows as ''
            assert (text == "" and np.isnan(bound)) or float(text) == pytest.approx(bound, rel=1e-3, abs=1e-4)
    top = rec["prediction"]["predicted_class"]
    assert page.inner_text("#prediction").startswith(f"Prediction: {top}: {rec['prediction']['probabilities'][top]:.3f}")
    assert page.inner_text("#missing").endswith("ct")

    # The overlay: pixels of the brain segment's colour appear in the axial slice view.
    seg = slicerio.read_segmentation(str(out / "segmentation.seg.nrrd"), skip_voxels=True)
    color = [int(round(255 * c)) for c in next(s["color"] for s in seg["segments"] if s["name"] == "brain")]
    n_before = _tinted_pixels(before, color)
    deadline, n_after = time.time() + 30, 0
    while time.time() < deadline:
        after = _axial_view(page).screenshot()
        n_after = _tinted_pixels(after, color)
        if n_after > n_before + 1000:
            break
        time.sleep(1)
    (data["root"] / "axial_before.png").write_bytes(before)
    (data["root"] / "axial_after.png").write_bytes(after)
    assert n_after > n_before + 1000, f"segment colour {color}: {n_before} px before, {n_after} px after the run"
    if _shots():
        page.screenshot(path=str(_shots() / "web_result.png"))
        (_shots() / "web_axial_before.png").write_bytes(before)
        (_shots() / "web_axial_after.png").write_bytes(after)


@pytest.mark.parametrize("case, message", [("far", "overlap"), ("pet", "trained for the image modalities")])
def test_bad_input_shows_the_error_and_the_app_stays_usable(page, data, case, message):
    _open(page, data[case])
    page.fill("#checkpoint-input", str(data["ckpt"]))
    page.fill("#samples-input", "2")
    page.locator("#ttt-checkbox").uncheck(force=True)
    page.click("#run-button")
    page.wait_for_selector("#error", timeout=RUN_TIMEOUT_MS)
    text = page.inner_text("#error")
    assert message in text and "clinfusediff infer: error:" in text, text
    assert page.locator("#prediction").count() == 0
    if _shots() and case == "far":
        page.screenshot(path=str(_shots() / "web_error.png"))
    # still usable: Run is enabled again, and another patient opens
    assert page.locator("#run-button").is_enabled()
    _open(page, data["good"])
    assert page.locator("#error").count() == 0 and page.locator("#use-mri_t2").is_checked()
