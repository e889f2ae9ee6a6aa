#!/usr/bin/env python3
"""Per-file figures of the last scripts/mutants.sh run, as a Markdown table.

    scripts/mutants_summary.py [mutants.out]

Reads every GROUP/mutants.out/outcomes.json under the directory (cargo-mutants'
own record) and prints, per source file: mutants caught, missed, timed out
(the tests hung past the bound: a hang is a failure they detected) and unviable
(the mutant did not build), then each missed mutant by name.

A rerun (`scripts/mutants.sh --rerun GROUP -- -F REGEX`, or `-- --iterate` in
the same output directory after copying it aside) overrides the earlier outcome of
the same mutant: reports are read oldest first, and a mutant is known by its file,
column and change, not its line, so a rerun after code above it grew or shrank
still overrides it. A mutant of code since removed keeps its last outcome.
"""

import collections
import json
import pathlib
import re
import sys

KINDS = {
    "CaughtMutant": "caught",
    "MissedMutant": "missed",
    "Timeout": "timeout",
    "Unviable": "unviable",
}


def identity(name: str) -> str:
    """`FILE:LINE:COLUMN: CHANGE` without its line."""
    match = re.match(r"^(.*?):\d+:(\d+): (.*)$", name)
    return f"{match[1]}:{match[2]}: {match[3]}" if match else name


def main() -> int:
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "mutants.out")
    reports = sorted(root.glob("*/mutants.out/outcomes.json"), key=lambda p: p.stat().st_mtime)
    if not reports:
        print(f"no outcomes.json under {root}; run scripts/mutants.sh first", file=sys.stderr)
        return 2
    outcome = {}  # mutant -> (file, kind, name)
    for report in reports:
        this_report = collections.defaultdict(list)
        for entry in json.loads(report.read_text())["outcomes"]:
            mutant = entry["scenario"]
            if not isinstance(mutant, dict) or "Mutant" not in mutant:
                continue  # the baseline
            mutant = mutant["Mutant"]
            kind = KINDS.get(entry["summary"], entry["summary"])
            this_report[identity(mutant["name"])].append((mutant["file"], kind, mutant["name"]))
        outcome.update(this_report)
    per_file = collections.defaultdict(collections.Counter)
    for entries in outcome.values():
        for file, kind, _ in entries:
            per_file[file][kind] += 1
    columns = ["caught", "missed", "timeout", "unviable"]
    print("| file | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    total = collections.Counter()
    for file in sorted(per_file):
        total.update(per_file[file])
        print(f"| {file} | " + " | ".join(str(per_file[file][c]) for c in columns) + " |")
    print("| **all** | " + " | ".join(f"**{total[c]}**" for c in columns) + " |")
    missed = sorted(
        name for entries in outcome.values() for _, kind, name in entries if kind == "missed"
    )
    if missed:
        print("\nMissed:")
        for name in missed:
            print(f"- {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
