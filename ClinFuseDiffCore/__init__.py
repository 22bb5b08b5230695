"""ClinFuseDiffCore: diffusion-based multimodal fusion with test-time training.

Pure Python (never imports slicer, qt, ctk or vtk), so that the Slicer module, the command line
and training scripts share one code path.
"""

__version__ = "0.1.0"
