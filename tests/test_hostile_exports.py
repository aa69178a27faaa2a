"""Hostile and broken files around the learner (issue 13): exports built to exhaust memory, leftovers of
killed saves, read-only targets, and Ctrl-C inside the optimizer step.

- An export's members are refused from their *declared* size before anything is inflated, and read with a
  bounded reader; a `model.json` asking for a giant model is refused from the parameter count it implies
  (the model is sized on PyTorch's `meta` device, which allocates nothing) before any weight exists.
- `atomic_write` (behind every save and export) removes the temporary files of its own naming that killed
  writes of the same target left behind, and never a live writer's file or anyone else's.
- A read-only checkpoint or export is not silently replaced.
- Ctrl-C during `opt.step()` waits for the step to finish, so every parameter group has stepped the same
  number of times and training can go on consistently.

Everything runs on the CPU with a 3-8-2 MLP and 96 synthetic points.
"""

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from coursekit.core import EXPORTABLE, atomic_write, build_exportable, exportable_spec
from coursekit.data.core import DataLoaders
from coursekit.learner import Callback, Learner, load_learner, simple_mlp

MIB = 2**20
MEMBERS = ("model.safetensors", "model.json", "data.json", "learner.json")


# --- a tiny learner and its export ------------------------------------------------------------------


def make_dls() -> DataLoaders:
    "96 points in 3-d, class 'pos' when x0 + x1 - x2 > 0; 64 for training, 32 for validation."
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(96, 3, generator=generator)
    targets = (inputs[:, 0] + inputs[:, 1] - inputs[:, 2] > 0).long()
    train = TensorDataset(inputs[:64], targets[:64])
    valid = TensorDataset(inputs[64:], targets[64:])
    return DataLoaders.from_dsets(train, valid, bs=16, device="cpu", vocab=["neg", "pos"])


def two_groups(model) -> list:
    "The MLP's first layer, and the rest: two parameter groups."
    return [list(model[0].parameters()), list(model[2].parameters())]


def make_learner(path, **kwargs) -> Learner:
    torch.manual_seed(0)
    learn = Learner(make_dls(), simple_mlp(3, 2, hidden=[8]), lr=1e-2, path=path, cbs=[], **kwargs)
    learn.model_spec = exportable_spec(simple_mlp, n_in=3, n_out=2, hidden=[8])
    return learn


def quiet_fit(learn: Learner, n_epoch: int = 1, **kwargs):
    with learn.no_bar():
        learn.fit(n_epoch, **kwargs)


@pytest.fixture
def members(tmp_path) -> dict:
    "The members of a good export of a trained learner."
    learn = make_learner(tmp_path)
    quiet_fit(learn)
    with zipfile.ZipFile(learn.export("good.ck")) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def write_zip(file: Path, members: dict) -> Path:
    with zipfile.ZipFile(file, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return file


def write_zip_streaming(file: Path, members: dict, big_member: str, chunk: bytes, n_chunks: int, tail=b"") -> Path:
    "A zip with `members`, and `big_member` written as `n_chunks` copies of `chunk`, then `tail` (never whole in memory)."
    with zipfile.ZipFile(file, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            if name != big_member:
                archive.writestr(name, data)
        with archive.open(big_member, "w", force_zip64=True) as stream:
            for _ in range(n_chunks):
                stream.write(chunk)
            stream.write(tail)
    return file


def set_declared_size(file: Path, member: str, size: int):
    "Rewrite `member`'s uncompressed size in the zip's central directory and local header (a lying header)."
    data = bytearray(file.read_bytes())
    name = member.encode()
    central = data.find(b"PK\x01\x02")  # the first central-directory entry
    while central != -1:
        name_length = struct.unpack_from("<H", data, central + 28)[0]
        if data[central + 46 : central + 46 + name_length] == name:
            struct.pack_into("<I", data, central + 24, size)
            local = struct.unpack_from("<I", data, central + 42)[0]
            struct.pack_into("<I", data, local + 22, size)
            file.write_bytes(bytes(data))
            return
        central = data.find(b"PK\x01\x02", central + 4)
    raise AssertionError(f"{member} is not in {file}")


def load_error(file: Path, **kwargs) -> Exception:
    "The exception `load_learner(file)` raises (the test fails if it loads)."
    with pytest.raises(Exception) as caught:
        load_learner(file, device="cpu", **kwargs)
    return caught.value


def load_error_and_peak(file):
    "The error `load_learner(file)` raises, and the peak memory Python allocated while it ran."
    tracemalloc.start()
    try:
        error = load_error(file)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return error, peak


@pytest.fixture
def opened(monkeypatch) -> list:
    "The names of the zip members opened for reading (i.e. inflated) while the test runs."
    names = []
    real_open = zipfile.ZipFile.open

    def recording_open(self, name, mode="r", *args, **kwargs):
        if mode == "r":
            names.append(getattr(name, "filename", name))
        return real_open(self, name, mode, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", recording_open)
    return names


# === item 5: exports as resource bombs =================================================================


@pytest.mark.parametrize("member", MEMBERS)
def test_a_member_declaring_a_huge_size_is_refused_before_inflating(tmp_path, members, opened, member):
    """A member whose declared size (3 GiB) is far more than that member can legitimately be is refused
    from the zip's directory alone: a ValueError naming the file, the member and the limit, and the member
    is never opened."""
    file = write_zip(tmp_path / "bomb.ck", members)
    set_declared_size(file, member, 3 * 2**30)
    error = load_error(file)
    message = str(error)
    assert isinstance(error, ValueError), f"{type(error).__name__}: {message}"
    assert "bomb.ck" in message and member in message and "limit" in message, message
    assert member not in opened, f"{member} was inflated before its size was checked"


def test_a_weights_bomb_is_refused_without_using_memory(tmp_path, members):
    """A 1 MB export whose model.safetensors inflates to 256 MiB (zeros), honestly declared: refused from
    the size of the weights the model in model.json can hold, before a byte is inflated."""
    file = write_zip_streaming(tmp_path / "bomb.ck", members, "model.safetensors", bytes(MIB), 256)
    assert file.stat().st_size < 2 * MIB
    error, peak = load_error_and_peak(file)
    message = str(error)
    assert isinstance(error, ValueError), f"{type(error).__name__}: {message}"
    assert "bomb.ck" in message and "model.safetensors" in message and "limit" in message, message
    assert peak < 32 * MIB, f"loading the bomb used {peak / MIB:.0f} MiB"


def test_a_json_bomb_is_refused_without_using_memory(tmp_path, members):
    "A data.json of 80 MiB (valid JSON: whitespace, then the real spec) is refused before it is inflated."
    padding = b" " * MIB
    file = write_zip_streaming(tmp_path / "bomb.ck", members, "data.json", padding, 80, tail=members["data.json"])
    error, peak = load_error_and_peak(file)
    message = str(error)
    assert isinstance(error, ValueError), f"{type(error).__name__}: {message}"
    assert "data.json" in message and "limit" in message, message
    assert peak < 32 * MIB, f"loading the bomb used {peak / MIB:.0f} MiB"


def test_a_member_lying_about_its_size_is_read_with_a_bounded_reader(tmp_path, members):
    """model.json declares 100 bytes but inflates to 50 MiB: the reader stops at the declared size, and the
    error names the file and the member. (Python's zipfile already stops there; this keeps it so.)"""
    spec = json.loads(members["model.json"])
    bloated = json.dumps(spec).encode() + b" " * (50 * MIB)
    file = write_zip(tmp_path / "liar.ck", {**members, "model.json": bloated})
    set_declared_size(file, "model.json", 100)
    error, peak = load_error_and_peak(file)
    message = str(error)
    assert isinstance(error, ValueError), f"{type(error).__name__}: {message}"
    assert "liar.ck" in message and "model.json" in message, message
    assert peak < 32 * MIB, f"reading the lying member used {peak / MIB:.0f} MiB"


@pytest.fixture
def built_models(monkeypatch) -> list:
    "The number of weights and the device of every model `simple_mlp` builds while the test runs."
    key = "coursekit.learner:simple_mlp"
    real_builder = EXPORTABLE[key]
    built = []

    def recording_builder(**kwargs):
        model = real_builder(**kwargs)
        first = next(iter(model.parameters()))
        built.append((sum(param.numel() for param in model.parameters()), first.device.type))
        return model

    monkeypatch.setitem(EXPORTABLE, key, recording_builder)
    return built


def test_a_tiny_spec_asking_for_a_giant_model_is_refused_before_allocating(tmp_path, members, built_models):
    """A 100-byte model.json asking for hidden=[4000, 4000] (16 million weights, 64 MB) beside weights of a
    few hundred bytes: refused from the parameter count the spec implies, before any weight is allocated."""
    spec = {"builder": "coursekit.learner:simple_mlp", "kwargs": {"n_in": 3, "n_out": 2, "hidden": [4000, 4000]}}
    file = write_zip(tmp_path / "giant.ck", {**members, "model.json": json.dumps(spec)})
    error = load_error(file)
    message = str(error)
    assert isinstance(error, ValueError), f"{type(error).__name__}: {message}"
    assert "giant.ck" in message and "model.json" in message and "model.safetensors" in message, message
    assert "16,028,002" in message, message  # the parameter count the spec implies
    allocated = [count for count, device in built_models if device != "meta"]
    assert not allocated, f"a model with {allocated} weights was allocated before the check"


def test_a_model_beyond_max_params_is_refused_before_allocating(tmp_path, members, built_models):
    """Weights declared big enough (3 GiB) for a model of 2 billion weights: the model is refused from
    `max_params` (default 1 billion) before it is built for real; the message says how to allow it."""
    spec = {"builder": "coursekit.learner:simple_mlp", "kwargs": {"n_in": 3, "n_out": 2, "hidden": [44720, 44720]}}
    file = write_zip(tmp_path / "huge.ck", {**members, "model.json": json.dumps(spec)})
    set_declared_size(file, "model.safetensors", 3 * 2**30)
    error = load_error(file)
    message = str(error)
    assert isinstance(error, ValueError), f"{type(error).__name__}: {message}"
    assert "huge.ck" in message and "model.json" in message and "max_params=" in message, message
    assert "2,000,191,442" in message, message  # the parameter count the spec implies
    assert not [count for count, device in built_models if device != "meta"]


def test_max_params_can_be_lowered_and_a_good_export_still_loads(tmp_path, members):
    file = write_zip(tmp_path / "good.ck", members)
    assert load_learner(file, device="cpu").predict(torch.tensor([1.0, 1.0, -1.0]))[0] in ("neg", "pos")
    error = load_error(file, max_params=10)
    assert isinstance(error, ValueError) and "max_params=" in str(error) and " 50 " in str(error), str(error)


MODEL_SPECS = [
    ("coursekit.learner:simple_mlp", {"n_in": 3, "n_out": 2, "hidden": [8, 4], "bn": True}),
    ("coursekit.vision.learner:cnn_model", {"arch": "resnet18", "n_out": 3}),
    ("coursekit.vision.unet:unet_model", {"arch": "resnet18", "n_out": 4}),
    ("coursekit.tabular.learner:TabularModel", {"emb_szs": [[5, 3]], "n_cont": 2, "out_sz": 1, "layers": [8], "y_range": [0, 1]}),
    ("coursekit.tabular.collab:EmbeddingDotBias", {"n_factors": 4, "n_users": 7, "n_items": 9, "y_range": [0, 5.5]}),
    ("coursekit.tabular.collab:EmbeddingNN", {"emb_szs": [[7, 3], [9, 3]], "layers": [8], "y_range": [0, 5.5]}),
]


@pytest.mark.parametrize("builder, kwargs", MODEL_SPECS, ids=[spec[0] for spec in MODEL_SPECS])
def test_every_model_builder_can_be_sized_without_allocating(builder, kwargs):
    """The size check builds the model on the meta device: every registered model builder must work
    there and give the same weights (names and shapes) as a real build."""
    spec = {"builder": builder, "kwargs": kwargs}
    with torch.device("meta"):
        sized = build_exportable(spec)
    real = build_exportable(spec)
    assert all(tensor.device.type == "meta" for tensor in sized.state_dict().values())
    sized_shapes = {name: tuple(tensor.shape) for name, tensor in sized.state_dict().items()}
    real_shapes = {name: tuple(tensor.shape) for name, tensor in real.state_dict().items()}
    assert sized_shapes == real_shapes


# === item 11: leftovers of killed saves, read-only files ===============================================

WRITER = textwrap.dedent(
    """
    import sys, time
    from coursekit.core import atomic_write
    def write(f):
        f.write(b"x" * 100_000)
        f.flush()
        print("writing", flush=True)
        time.sleep(120)
    atomic_write(sys.argv[1], write)
    """
)


def start_writer(target: Path) -> subprocess.Popen:
    "A process in the middle of `atomic_write(target)`: its temporary file is written, not yet renamed."
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    return writer


def temporaries(folder: Path) -> list:
    return sorted(path.name for path in folder.iterdir() if path.name.endswith(".tmp"))


def test_a_save_removes_what_killed_saves_left_behind(tmp_path):
    """Three saves of one file running at once, all killed with SIGKILL, leave three hidden temporaries;
    the next save of that file removes them."""
    learn = make_learner(tmp_path)
    target = learn.save("stage")
    writers = [start_writer(target) for _ in range(3)]
    for writer in writers:
        writer.kill()
        writer.wait()
    assert len(temporaries(target.parent)) == 3
    learn.save("stage")
    assert temporaries(target.parent) == []
    assert sorted(path.name for path in target.parent.iterdir()) == ["stage.pth"]


def test_killed_saves_one_after_another_never_pile_up(tmp_path):
    """Five saves of one file killed one after the other (a notebook interrupted again and again): each new
    save removes the previous one's leftover, so at most one is ever on disk, and none after a save completes."""
    learn = make_learner(tmp_path)
    target = learn.save("stage")
    for _ in range(5):
        writer = start_writer(target)
        writer.kill()
        writer.wait()
        assert len(temporaries(target.parent)) <= 1
    learn.save("stage")
    assert temporaries(target.parent) == []


def test_leftover_cleaning_spares_live_writers_other_targets_and_user_files(tmp_path):
    """Only stale temporaries of coursekit's own naming, for the file being written: a save running in
    another process, another file's leftovers and a user's look-alike files are all left alone."""
    learn = make_learner(tmp_path)
    target = learn.save("stage")
    folder = target.parent
    other = learn.save("other")
    dead = start_writer(other)
    dead.kill()
    dead.wait()
    user_files = [".stage.pth.notes.tmp", ".stage.pth.0123456789ab.tmp.bak", "stage.pth.0123456789ab.tmp",
                  ".stage.pth.0123456789AB.tmp"]
    for name in user_files:
        (folder / name).write_bytes(b"mine")
    live = start_writer(target)
    try:
        before = set(temporaries(folder))
        learn.save("stage")
        after = set(temporaries(folder))
        assert after == before, f"removed {before - after}"
    finally:
        live.kill()
        live.wait()
    for name in user_files:
        assert (folder / name).read_bytes() == b"mine"


def test_atomic_write_cleans_its_own_leftovers_for_any_file(tmp_path):
    "The same holds for every file coursekit writes (a cleaner's CSV, a token cache...), not only checkpoints."
    target = atomic_write(tmp_path / "cleaned.csv", lambda f: f.write(b"a,b\n"))
    writer = start_writer(target)
    writer.kill()
    writer.wait()
    assert len(temporaries(tmp_path)) == 1
    atomic_write(target, lambda f: f.write(b"a,b\n1,2\n"))
    assert temporaries(tmp_path) == [] and target.read_bytes() == b"a,b\n1,2\n"


@pytest.mark.parametrize("kind", ["export", "save"])
def test_a_read_only_file_is_not_replaced(tmp_path, kind):
    """Exporting or saving over a file made read-only (0444) refuses with a PermissionError that names the
    file and says how to replace it; the file keeps its bytes and its mode."""
    learn = make_learner(tmp_path)
    file = learn.export("model.ck") if kind == "export" else learn.save("stage")
    old_bytes = file.read_bytes()
    file.chmod(0o444)
    quiet_fit(learn)
    with pytest.raises(PermissionError) as caught:
        learn.export("model.ck") if kind == "export" else learn.save("stage")
    message = str(caught.value)
    assert str(file) in message and "read-only" in message and "chmod" in message, message
    assert file.read_bytes() == old_bytes and (file.stat().st_mode & 0o777) == 0o444
    assert temporaries(file.parent) == []
    file.chmod(0o644)  # as the message says: make it writable, and the save goes through
    learn.export("model.ck") if kind == "export" else learn.save("stage")
    assert file.read_bytes() != old_bytes


# === Ctrl-C inside the optimizer step ===================================================================


class InterruptInsideStep(Callback):
    """At the `at`-th optimizer step, sends this process SIGINT (what Ctrl-C does) after the optimizer
    has updated its first parameter group and before the second: Adam's per-group `_init_group` is wrapped
    for that one step."""

    def __init__(self, at: int):
        self.at = at
        self.steps = 0
        self.sent = False

    def before_step(self, learn):
        self.steps += 1
        if self.steps != self.at:
            return
        opt = learn.opt
        real_init_group = opt._init_group
        groups_seen = []

        def init_group(group, *args, **kwargs):
            groups_seen.append(group)
            if len(groups_seen) == 2 and not self.sent:
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)
            return real_init_group(group, *args, **kwargs)

        opt._init_group = init_group

    def after_fit(self, learn):
        learn.opt.__dict__.pop("_init_group", None)


def step_counts(learn: Learner) -> list:
    "Adam's step count for each parameter of each group."
    return [[float(learn.opt.state[param]["step"]) for param in group["params"]] for group in learn.opt.param_groups]


def test_ctrl_c_inside_the_optimizer_step_leaves_every_group_stepped_alike(tmp_path):
    """Ctrl-C arriving between two parameter groups of `opt.step()`: the interrupt still stops `fit`, but
    only once the step is complete, so all parameter groups (and their Adam step counts) agree and a
    checkpoint saved then resumes consistently."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "this test needs Python's Ctrl-C handler"
    learn = make_learner(tmp_path, splitter=two_groups)
    quiet_fit(learn)  # 4 steps: Adam has state in both groups
    interrupt = InterruptInsideStep(at=2)
    with pytest.raises(KeyboardInterrupt):
        quiet_fit(learn, cbs=[interrupt])
    assert interrupt.sent, "the test did not interrupt the step"
    counts = step_counts(learn)
    assert len({count for group in counts for count in group}) == 1, f"step counts split between groups: {counts}"
    assert counts[0][0] == 6.0, counts  # 4 steps, then 2 in the interrupted fit: the interrupted step finished
    learn.load(learn.save("after_ctrl_c").stem)
    quiet_fit(learn)
    counts = step_counts(learn)
    assert len({count for group in counts for count in group}) == 1 and counts[0][0] == 10.0, counts
