#!/usr/bin/env python3
"""Every test docs/claims.md cites exists.

The second column of each table row names the tests that hold a claim:
`file: name, name`  (a function in tests/file.rs; "macos `name`" is tests/macos.rs),
`module::tests::name` (a unit test in src/module.rs or src/module/mod.rs;
`module::tests::*` means the module's tests), and prose. A cited name that no
longer exists is a promise nobody checks: this prints each one and exits 1.
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
CLAIMS = ROOT / "docs" / "claims.md"

# Test names are long snake_case; settings and fields (`idleTimeout`, `stop`) are not.
TEST_NAME = re.compile(r"^[a-z0-9]+(?:_[a-z0-9]+){2,}$")
UNIT_TEST = re.compile(r"^([a-z0-9_]+(?:::[a-z0-9_]+)*)::tests::([a-z0-9_]+|\*)$")
# `file:` or `**Mac**: file` before a list of names.
FILE_PREFIX = re.compile(r"^\s*(?:\*\*Mac\*\*:\s*)?([a-z_]+):?\s+(?=`)")


def functions(path):
    text = path.read_text(encoding="utf-8")
    return set(re.findall(r"\bfn\s+([A-Za-z0-9_]+)", text))


def module_file(module):
    parts = module.split("::")
    for candidate in (
        ROOT / "src" / pathlib.Path(*parts).with_suffix(".rs"),
        ROOT / "src" / pathlib.Path(*parts) / "mod.rs",
    ):
        if candidate.exists():
            return candidate
    return None


def main():
    test_files = {p.stem: p for p in (ROOT / "tests").glob("*.rs")}
    every_test_fn = set()
    for path in test_files.values():
        every_test_fn |= functions(path)
    problems = []
    cited = 0
    for number, line in enumerate(CLAIMS.read_text(encoding="utf-8").splitlines(), 1):
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) < 2 or cells[0] == "claim":
            continue
        held_by = cells[1]
        for segment in held_by.split(";"):
            # Where the names of this segment live: the tests file it starts with,
            # then the module of the last `module::tests::name` before them.
            prefix = FILE_PREFIX.search(segment)
            context = test_files.get(prefix.group(1)) if prefix else None
            for name in re.findall(r"`([^`]+)`", segment):
                unit = UNIT_TEST.match(name)
                if unit:
                    cited += 1
                    path = module_file(unit.group(1))
                    context = path
                    if path is None:
                        problems.append(f"line {number}: no module src/{unit.group(1)} for `{name}`")
                    elif unit.group(2) == "*":
                        if "mod tests" not in path.read_text(encoding="utf-8"):
                            problems.append(f"line {number}: {path.relative_to(ROOT)} has no tests (`{name}`)")
                    elif unit.group(2) not in functions(path):
                        problems.append(f"line {number}: no test `{unit.group(2)}` in {path.relative_to(ROOT)}")
                    continue
                if not TEST_NAME.match(name):
                    continue
                cited += 1
                if context is not None:
                    if name not in functions(context):
                        problems.append(f"line {number}: no test `{name}` in {context.relative_to(ROOT)}")
                elif name not in every_test_fn:
                    problems.append(f"line {number}: no test `{name}` under tests/")
    for problem in problems:
        print(f"docs/claims.md: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"docs/claims.md: all {cited} cited tests exist")
    return 0


if __name__ == "__main__":
    sys.exit(main())
