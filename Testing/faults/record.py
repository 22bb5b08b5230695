"""One row of the reliability table per fault-injection case (README: reliability section).

``record(case, outcome, detail)`` appends ``{"case", "outcome", "detail", "test"}`` as one JSON
line to the file named by ``CLINFUSEDIFF_FAULT_TABLE`` (nothing happens when it is unset). The
suite's tests call it after their assertions passed, so the table lists only what was shown.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

# pytest's per-test folders (/tmp/pytest-of-<user>/pytest-<n>/<test>0/) are noise in the table
_TMP = re.compile(re.escape(tempfile.gettempdir()) + r"/pytest-of-[^/]+/pytest-\d+/[^/\s]+")


def record(case: str, outcome: str, detail: str) -> None:
    """Append a row: ``case`` (what was tried), ``outcome`` (``clean error`` | ``correct result``),
    ``detail`` (what the user sees, and that nothing was lost; pytest temp folders shown as
    ``<tmp>``)."""
    path = os.environ.get("CLINFUSEDIFF_FAULT_TABLE")
    if not path:
        return
    detail = _TMP.sub("<tmp>", " ".join(str(detail).split()))
    row = {"case": case, "outcome": outcome, "detail": detail,
           "test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
