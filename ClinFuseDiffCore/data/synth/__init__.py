"""The embedded synthetic multimodal brain-tumour cohort (``clinfusediff synth``).

Real MNI152 anatomy from nilearn, a tumour with sub-regions and mass effect, six contrasts on a
patient-specific scanner grid, a clinical table and an outcome from a documented hidden model
(``docs/COHORT.md``).

* :func:`generate_cohort` writes a cohort (generic or BraTS layout) and returns a summary;
* :func:`sample_patient_parameters` draws patients' hidden features, clinical values and
  outcomes without rendering images (fast; the same values ``generate_cohort`` uses).
"""

from .cohort import generate_cohort, patient_files
from .params import (
                     FEATURE_MODALITIES,
                     LABEL_COEFFICIENTS,
                     PatientParameters,
                     sample_patient_parameters,
                     site_profiles,
)
from .render import BRAIN_LABELS, CONTRAST, render_patient

__all__ = [
    "BRAIN_LABELS", "CONTRAST", "FEATURE_MODALITIES", "LABEL_COEFFICIENTS", "PatientParameters",
    "generate_cohort", "patient_files", "render_patient", "sample_patient_parameters",
    "site_profiles",
]
