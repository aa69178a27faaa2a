#!/usr/bin/env python3
"""Convert notebooks to and from a plain-text "percent" format, for editing with any text editor.

    python tools/nbtext.py to-text nbs/core/06_learner.ipynb  > /tmp/learner.py
    python tools/nbtext.py to-nb   /tmp/learner.py nbs/core/06_learner.ipynb

Text format: cells start with a line `# %%` (code) or `# %% [markdown]` (markdown, each line
written as `# text`). The notebook is the source of truth; the text is a working copy.
Outputs are dropped, as `nbdev-clean` would drop them in library notebooks.
"""
import json, sys
from pathlib import Path

KERNEL = {"display_name": "python3", "language": "python", "name": "python3"}


def notebook_to_text(nb: dict) -> str:
    parts = []
    for cell in nb["cells"]:
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if cell["cell_type"] == "markdown":
            body = "\n".join(("# " + l) if l else "#" for l in src.split("\n"))
            parts.append("# %% [markdown]\n" + body)
        else:
            parts.append("# %%\n" + src)
    return "\n\n".join(parts) + "\n"


def text_to_notebook(text: str) -> dict:
    cells, kind, lines = [], None, []

    def flush():
        if kind is None: return
        while lines and not lines[-1].strip(): lines.pop()
        while lines and not lines[0].strip(): lines.pop(0)
        if kind == "markdown":
            src = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#") for l in lines)
            cells.append({"cell_type": "markdown", "metadata": {}, "source": src})
        else:
            cells.append({"cell_type": "code", "execution_count": None, "metadata": {},
                          "outputs": [], "source": "\n".join(lines)})

    for line in text.split("\n"):
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    for c in cells:  # store sources as lists of lines, as Jupyter does
        c["source"] = c["source"].splitlines(keepends=True)
    return {"cells": cells, "metadata": {"kernelspec": KERNEL}, "nbformat": 4, "nbformat_minor": 5}


def main(argv):
    if len(argv) < 2 or argv[0] not in ("to-text", "to-nb"):
        sys.exit(__doc__)
    if argv[0] == "to-text":
        sys.stdout.write(notebook_to_text(json.loads(Path(argv[1]).read_text())))
    else:
        if len(argv) != 3: sys.exit(__doc__)
        nb = text_to_notebook(Path(argv[1]).read_text())
        Path(argv[2]).parent.mkdir(parents=True, exist_ok=True)
        Path(argv[2]).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
