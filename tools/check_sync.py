#!/usr/bin/env python3
"""Fail when the notebooks are not clean or when `coursekit/` does not match them.

Runs `nbdev-clean` and `nbdev-export`, then compares every notebook and every exported file with
what was there before. Works in a fresh clone and in a working tree with uncommitted changes.
"""
import hashlib, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def snapshot():
    files = list((ROOT / "nbs").rglob("*.ipynb")) + list((ROOT / "coursekit").rglob("*.py"))
    return {f.relative_to(ROOT).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in files if ".ipynb_checkpoints" not in f.parts}


def changed_by(cmd):
    before = snapshot()
    subprocess.run([str(BIN / cmd)], cwd=ROOT, check=True)
    after = snapshot()
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def main():
    problems = []
    dirty = changed_by("nbdev-clean")
    if dirty: problems.append("nbdev-clean changed these notebooks (commit the cleaned versions):\n  " + "\n  ".join(dirty))
    stale = changed_by("nbdev-export")
    if stale: problems.append("nbdev-export changed these files: coursekit/ did not match the notebooks "
                              "(never edit coursekit/ by hand; commit the exported files):\n  " + "\n  ".join(stale))
    if problems: sys.exit("\n".join(problems))
    print("notebooks clean; coursekit/ matches the notebooks")


if __name__ == "__main__":
    main()
