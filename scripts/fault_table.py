#!/usr/bin/env python
"""Run the fault-injection suite (``Testing/faults``) and print the reliability table.

Each test of the suite calls ``Testing/faults/record.py:record(case, outcome, detail)`` after its
assertions passed; with ``CLINFUSEDIFF_FAULT_TABLE`` set, every call appends one JSON line. This
script sets it to a fresh file, runs pytest, and turns the lines into a Markdown table
(case | what the user sees | outcome) with the counts, so the README's table is produced by the
suite, not written by hand.

Usage::

    python scripts/fault_table.py                   # run the suite, print the table
    python scripts/fault_table.py --update-readme   # ... and put it in README.md (between markers)
    python scripts/fault_table.py --from rows.jsonl # only format rows recorded earlier

Exit status: pytest's (non-zero when a case failed; its row is then missing from the table).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- fault-table:start -->", "<!-- fault-table:end -->"


def run_suite(rows_path: Path, pytest_args: list[str]) -> tuple[int, str]:
    """Run ``pytest Testing/faults`` with the table file set; (exit code, pytest's summary line)."""
    env = {**os.environ, "CLINFUSEDIFF_FAULT_TABLE": str(rows_path)}
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "pytest", "Testing/faults", "-q", "-p", "no:cacheprovider", *pytest_args]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [line for line in p.stdout.strip().splitlines() if line.strip()]
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-2000:])
    return p.returncode, (lines[-1].strip("= ") if lines else "no output")


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def markdown(rows: list[dict], summary: str) -> str:
    """The table, then one line of counts."""
    out = ["| case | what the user sees | outcome |", "|---|---|---|"]
    out += [f"| {cell(r['case'])} | {cell(r['detail'])} | {cell(r['outcome'])} |" for r in rows]
    clean = sum(r["outcome"] == "clean error" for r in rows)
    correct = sum(r["outcome"] == "correct result" for r in rows)
    out += ["", f"{len(rows)} cases: {clean} clean errors, {correct} correct results, "
                f"{len(rows) - clean - correct} other. pytest: {summary}."]
    return "\n".join(out) + "\n"


def update_readme(table: str, readme: Path) -> None:
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: no {START} ... {END} markers; add them where the table goes")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table}{END}{tail}", encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="rows", type=Path, default=None,
                    help="format rows recorded earlier (JSON lines) instead of running the suite")
    ap.add_argument("--update-readme", action="store_true",
                    help=f"write the table into README.md between {START} and {END}")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)
    if args.rows is not None:
        rc, summary = 0, f"rows from {args.rows}"
        rows = read_rows(args.rows)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows_path = Path(tmp) / "faults.jsonl"
            rc, summary = run_suite(rows_path, args.pytest_args)
            rows = read_rows(rows_path)
    table = markdown(rows, summary)
    print(table, end="")
    if args.update_readme:
        update_readme(table, REPO / "README.md")
    return rc


if __name__ == "__main__":
    sys.exit(main())
