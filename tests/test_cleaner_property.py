"""Property test of the image cleaner: random sequences of widget actions on a temporary folder.

Hypothesis drives the `ImageCleaner` the way a user would (Keep / Delete buttons, the relabel box, the
class and split filters, next / previous page, Apply, Undo, and closing and reopening the cleaner), while
a separate model records what the user decided, keyed by each file's content. After every action:
- no file is lost: the files under the dataset folder (trash included) are exactly the ones we started
  with, and the files outside it are untouched;
- `cleaned.csv` on disk matches the decisions: one row per file, each row's `fname` is where that file is,
  with the label, deleted and reviewed flags the user chose;
- after Apply the folders match the decisions (deleted files in `.trash/`, kept ones in their class folder).
The figures (actions tried, files lost) are printed and written to `test-artifacts/cleaner_property.json`.
"""
import hashlib
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from PIL import Image

from coursekit.vision.utils import TRASH_FOLDER
from coursekit.widgets import ImageCleaner, read_cleaned

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
PAGE_SIZE = 3
LABELS = ["cats", "dogs", "birds"]  # "birds" is a new class: relabelling to it creates a folder
FIGURES = Counter()


def digest(path: Path) -> str: return hashlib.sha256(path.read_bytes()).hexdigest()


def all_files(folder: Path) -> Counter:
    "Content digests of every image file under `folder` (trash included), with multiplicity."
    return Counter(digest(p) for p in folder.rglob("*.png") if p.is_file())


def make_dataset(base: Path) -> Path:
    "Two classes in train/ and valid/, with the same file names in both classes so that moves collide."
    root, k = base / "data", 0
    for split, n in (("train", 4), ("valid", 2)):
        for cls in ("cats", "dogs"):
            (root / split / cls).mkdir(parents=True)
            for j in range(n):
                k += 1
                Image.new("RGB", (8, 8), (k * 7 % 256, k * 13 % 256, k * 29 % 256)).save(root / split / cls / f"img_{j}.png")
    (base / "outside").mkdir()
    Image.new("RGB", (8, 8), "white").save(base / "outside" / "mine.png")
    return root


class CleanerMachine(RuleBasedStateMachine):
    @initialize()
    def start(self):
        self.base = Path(tempfile.mkdtemp(prefix="cleaner-prop-"))
        self.root = make_dataset(self.base)
        self.start_files = all_files(self.root)
        self.outside = all_files(self.base / "outside")
        self.cleaner = ImageCleaner.from_folder(self.root, page_size=PAGE_SIZE)
        # the model: what the user decided, keyed by file content
        self.decided = {digest(self.root / it.fname): [it.data_label, False, False] for it in self.cleaner.state.items}
        self.just_applied = False

    def teardown(self):
        shutil.rmtree(self.base, ignore_errors=True)

    def _tile(self, k):
        tile = self.cleaner.tiles[k]
        return None if tile.i is None else tile

    def _key(self, tile): return digest(self.cleaner.state.root / self.cleaner.state.items[tile.i].fname)

    def _count(self, name): FIGURES["actions tried"] += 1; FIGURES[name] += 1; self.just_applied = False

    @rule(k=st.integers(0, PAGE_SIZE - 1))
    def delete(self, k):
        self._count("delete")
        tile = self._tile(k)
        if tile is None: return
        key = self._key(tile)
        tile.delete_button.click()
        self.decided[key][1:] = [True, True]

    @rule(k=st.integers(0, PAGE_SIZE - 1))
    def keep(self, k):
        self._count("keep")
        tile = self._tile(k)
        if tile is None: return
        key = self._key(tile)
        tile.keep_button.click()
        self.decided[key][1:] = [False, True]

    @rule(k=st.integers(0, PAGE_SIZE - 1), label=st.sampled_from(LABELS))
    def relabel(self, k, label):
        self._count("relabel")
        tile = self._tile(k)
        if tile is None: return
        key = self._key(tile)
        tile.label_box.value = label
        if label != self.decided[key][0]: self.decided[key] = [label, False, True]

    @rule(forward=st.booleans())
    def page(self, forward):
        self._count("page")
        (self.cleaner.next_button if forward else self.cleaner.prev_button).click()

    @rule(label=st.sampled_from(["", "cats", "dogs"]), split=st.sampled_from(["", "train", "valid"]))
    def filter(self, label, split):
        self._count("filter")
        self.cleaner.class_filter.value = label
        self.cleaner.split_filter.value = split

    @rule()
    def apply(self):
        self._count("apply")
        self.cleaner.apply_button.click()
        self.just_applied = True

    @rule()
    def undo(self):
        self._count("undo")
        self.cleaner.undo_button.click()

    @rule()
    def reopen(self):
        "Close the cleaner and open a new one on the same folder, as after a kernel restart."
        self._count("reopen")
        self.cleaner = ImageCleaner.from_folder(self.root, page_size=PAGE_SIZE)

    @invariant()
    def no_file_lost(self):
        if not hasattr(self, "root"): return
        now = all_files(self.root)
        lost = sum((self.start_files - now).values())
        FIGURES["files lost"] += lost
        assert lost == 0, f"{lost} files lost"
        assert now == self.start_files, "files appeared that were not there before"
        assert all_files(self.base / "outside") == self.outside, "a file outside the dataset folder changed"

    @invariant()
    def csv_matches_decisions(self):
        if not hasattr(self, "root"): return
        df = read_cleaned(self.root, drop_deleted=False)
        assert len(df) == len(self.decided), f"{len(df)} rows for {len(self.decided)} files"
        seen = {}
        for row in df.itertuples():
            path = self.root / row.fname
            assert path.is_file(), f"cleaned.csv says {row.fname} but there is no such file"
            seen[digest(path)] = [row.label, row.deleted, row.reviewed]
        assert seen == self.decided, "cleaned.csv does not match the decisions"
        assert self.cleaner.counter.value.startswith(f"{sum(r for _, _, r in self.decided.values())} of {len(self.decided)}")
        if self.just_applied:
            for row in df.itertuples():
                in_trash = row.fname.startswith(TRASH_FOLDER + "/")
                assert in_trash == row.deleted, f"after apply, {row.fname} is {'' if in_trash else 'not '}in the trash"
                if not row.deleted: assert Path(row.fname).parent.name == row.label, f"{row.fname} is not in {row.label}/"


def test_cleaner_never_loses_files_and_csv_matches_decisions():
    FIGURES.clear()
    run_state_machine_as_test(CleanerMachine, settings=settings(
        max_examples=40, stateful_step_count=30, deadline=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    figures = {"actions tried": FIGURES["actions tried"], "files lost": FIGURES["files lost"],
               "by action": {k: v for k, v in sorted(FIGURES.items()) if k not in ("actions tried", "files lost")}}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "cleaner_property.json").write_text(json.dumps(figures, indent=1))
    print(f"\ncleaner property test: {figures}")
    assert figures["actions tried"] >= 500, "too few actions were tried to mean anything"
    assert figures["by action"]["apply"] > 0 and figures["by action"]["undo"] > 0
    assert figures["files lost"] == 0
