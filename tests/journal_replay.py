"""Replaying the image cleaner's trash journal, for the tests that check it explains every file's place."""
from pathlib import Path

from coursekit.vision.utils import TrashJournal


def replay(root: Path, start: dict) -> dict:
    "Where the journal says every file is: `start`, moved by every move and undo line carried out."
    where, kept = dict(start), []
    for e in TrashJournal(root).entries():  # a void line cancels the latest matching move line
        if e["op"] == "void":
            same = [k for k, m in enumerate(kept) if m["op"] == "move" and (m["src"], m["dst"]) == (e["src"], e["dst"])]
            del kept[same[-1]]
        else:
            kept.append(e)
    for e in kept:
        if e["op"] == "move":
            where[e["dst"]] = where.pop(e["src"])
        elif e["op"] == "undo":
            for now, back in e["restored"].items():
                where[back] = where.pop(now)
    return where
