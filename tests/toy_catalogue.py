"""A catalogue entry for a test archive, for the download tests."""
from pathlib import Path

from coursekit.data.external import CATALOGUE, CatalogueEntry, file_hashes


def pin(monkeypatch, archive: Path, url: str, folder: str = "toyset", **override) -> CatalogueEntry:
    "Put an entry for `archive` (served at `url`) into the catalogue, pinned to its real size and hashes."
    h = file_hashes(archive)
    fields = dict(name="TOY", url=url, folder=folder, size=h["size"], sha256=h["sha256"],
                  md5_first_mib=h["md5_first_mib"], checksum_source="test", licence="test", citation="test")
    entry = CatalogueEntry(**(fields | override))
    monkeypatch.setitem(CATALOGUE, "TOY", entry)
    return entry
