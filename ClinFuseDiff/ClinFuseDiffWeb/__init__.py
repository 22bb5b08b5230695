"""ClinFuseDiff's web front end (trame-slicer): the Slicer module's Logic and Slicer's views in a browser."""
