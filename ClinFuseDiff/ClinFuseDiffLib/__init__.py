"""Qt-free parts of the ClinFuseDiff Slicer module, shared with the trame-slicer web app.

- ``common``: pure Python (no slicer, qt or vtk): modality names, settings, the
  ``clinfusediff infer`` argument list, the cancellable subprocess runner, parsers of its output.
- ``logic``: MRML work on an explicitly passed scene (volume nodes <-> files through Slicer's own
  storage nodes, the ``.seg.nrrd`` into a segmentation node, ``prediction.json`` into a table node,
  saving the scene). Imports ``slicer`` and ``vtk`` only: it runs inside the Slicer application and
  on the ``slicer-core`` package (no Qt), which the web app and the tests use.

Nothing here imports the heavy core (torch, MONAI): inference runs in a subprocess,
``python -m ClinFuseDiffCore.cli infer``, the same command as in the shell.
"""
