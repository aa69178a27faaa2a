"""Data-parallel training on torch.distributed, launched for real on the CPU (gloo, one thread per process): torchrun
with two processes, two simulated machines, a rank killed mid-epoch and the fit resumed, and `notebook_launcher`
from a script and from a Jupyter kernel.

This file is also the worker script torchrun runs: `python tests/test_distributed.py train OUT [options]` trains
a small classifier inside `learn.distrib_ctx()` and writes what the tests compare into OUT (outside the learner's
folder `OUT/learn`, where only rank 0 may write; an audit hook records every file each rank writes there)."""
import argparse
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch
from nbclient import NotebookClient

from coursekit.callbacks import CSVLogger, SaveModelCallback
from coursekit.core import exportable_spec, set_seed
from coursekit.data.core import DataLoaders
from coursekit.data.external import URLs, untar_data
from coursekit.distributed import ShardSampler, free_port, rank_distrib
from coursekit.interpret import ClassificationInterpretation
from coursekit.learner import Callback, Learner, load_learner, simple_mlp
from coursekit.metrics import accuracy, error_rate
from coursekit.tabular.data import Categorify, FillMissing, Standardize, TabularDataLoaders
from coursekit.tabular.learner import TabularModel, get_emb_sz
from coursekit.text.data import TextDataLoaders
from coursekit.text.learner import language_model_learner, text_classifier_learner
from coursekit.text.models import awd_lstm_clas_config, awd_lstm_lm_config
from coursekit.vision.data import ImageDataLoaders, aug_transforms

ROOT = Path(__file__).resolve().parent.parent
N_EPOCH = 3
LR = 0.05
BS = 8                      # per process; one process with the combined batch uses BS * 2
LAUNCH_TIMEOUT = 120        # seconds: a launch that takes longer has hung


def toy_data(bs: int) -> DataLoaders:
    "96 training and 33 validation points of two classes (33: the last validation batch is padded, then trimmed)."
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(129, 4, generator=generator)
    y = ((x[:, 0] + 0.5 * x[:, 1] - x[:, 2] + 0.3 * torch.randn(129, generator=generator)) > 0).long()
    samples = list(zip(x, y))
    return DataLoaders.from_dsets(samples[:96], samples[96:], bs=bs, device="cpu", vocab=["no", "yes"])


def toy_learner(bs: int, path: Path, cbs=()) -> Learner:
    "The same learner, the same initial weights, in every process (no batch-norm: the maths is that of one process)."
    set_seed(0)
    model = simple_mlp(4, 2, hidden=[16])
    learn = Learner(toy_data(bs), model, metrics=[accuracy, error_rate], path=path, cbs=list(cbs),
                    opt_func=torch.optim.SGD, lr=LR)
    learn.model_spec = exportable_spec(simple_mlp, n_in=4, n_out=2, hidden=[16])
    return learn


def weights(learn) -> dict:
    return {name: tensor.detach().clone() for name, tensor in learn.model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# The worker (run by torchrun)

class CrashAt(Callback):
    "Kill this process (SIGKILL: no Python error, no clean-up) at batch `batch` of epoch `epoch`, on rank `rank`."
    def __init__(self, rank: int, epoch: int, batch: int = 2):
        self.rank = rank
        self.epoch = epoch
        self.batch = batch

    def before_batch(self, learn):
        if learn.training and rank_distrib() == self.rank and (learn.epoch, learn.iter) == (self.epoch, self.batch):
            os.kill(os.getpid(), signal.SIGKILL)


def audit_writes(folder: Path) -> list:
    "Record every file opened for writing, renamed, removed or made under `folder` by this process (an audit hook)."
    seen = []
    folder = str(folder.resolve())
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, os.PathLike)):
            path, mode, flags = args
            if (mode and any(c in mode for c in "wax+")) or (flags and flags & writing):
                seen.append(("open", os.path.abspath(path)))
        elif event in ("os.rename", "os.replace", "os.remove", "os.mkdir") and isinstance(args[0], (str, os.PathLike)):
            seen.append((event, os.path.abspath(args[0])))
    sys.addaudithook(hook)
    return [seen, folder]


def worker(out: Path, crash_rank: int | None, resume: str | None):
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    learn_folder = out / "learn"
    seen, folder = audit_writes(learn_folder)
    cbs = [CSVLogger(append=resume is not None), SaveModelCallback(every_epoch=True, with_opt=True)]
    if crash_rank is not None:
        cbs.append(CrashAt(crash_rank, epoch=1))
    learn = toy_learner(BS, learn_folder)
    with learn.distrib_ctx():
        suggested = learn.lr_find(num_it=10, show_plot=False)  # every rank in lockstep; the weights are restored
        for cb in cbs:
            learn.add_cb(cb)
        learn.fit(N_EPOCH, resume=None if resume is None else learn_folder / resume)
        seed = learn.dls.train.sampler.seed
        preds, targets = learn.get_preds()
        confusion = ClassificationInterpretation.from_learner(learn).confusion_matrix()
        learn.save("final")
        learn.export()
        valid_again = learn.validate()
    assert type(learn.model).__name__ == "Sequential" and learn.dls.train.sampler is None   # a plain learner again
    learn.export("after.ck")                                                                # by rank 0, as any script
    result = {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"]), "seed": seed,
              "values": learn.recorder.values, "valid_again": valid_again,
              "weights": weights(learn), "preds": preds, "targets": targets, "confusion": confusion,
              "suggested": tuple(suggested),
              "writes": [path for event, path in seen if path.startswith(folder)]}
    torch.save(result, out / f"rank{rank}.pt")  # each rank its own file, outside the learner's folder


# ----------------------------------------------------------------------------------------------------------------
# The tests

class EpochPermutation(Callback):
    "For the one-process reference: the epoch's permutation, as `distrib_ctx` sets it on every rank."
    def before_epoch(self, learn):
        learn.dls.train.sampler.set_epoch(learn.epoch)


def reference(seed: int, tmp_path: Path) -> dict:
    "One process, the combined batch (BS * 2), the same seeded permutations: what two processes must equal."
    learn = toy_learner(BS * 2, tmp_path / "reference", [EpochPermutation()])
    for dl in learn.dls:
        dl.sampler = ShardSampler(0, 1, seed=seed)
    with learn.no_bar():
        learn.fit(N_EPOCH)
    for dl in learn.dls:
        dl.sampler = None
    preds, targets = learn.get_preds()
    confusion = ClassificationInterpretation.from_learner(learn).confusion_matrix()
    return {"values": learn.recorder.values, "weights": weights(learn), "preds": preds, "targets": targets,
            "confusion": confusion}


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def torchrun(*options: str) -> list:
    return [sys.executable, "-m", "torch.distributed.run", *options]


def run_job(command: list, timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment(), cwd=ROOT)
    return done


def check_against_reference(out: Path, tmp_path: Path, world_size: int = 2):
    ranks = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]
    assert [r["world_size"] for r in ranks] == [world_size] * world_size
    assert ranks[0]["seed"] == ranks[1]["seed"]
    assert ranks[0]["suggested"] == ranks[1]["suggested"] and ranks[0]["suggested"][0] > 0   # lr_find in lockstep
    expected = reference(ranks[0]["seed"], tmp_path)
    for result in ranks:
        for name, tensor in expected["weights"].items():
            torch.testing.assert_close(result["weights"][name], tensor, atol=1e-5, rtol=0)
        # accuracy and error rate exactly; losses to float rounding (the sums run in another order)
        assert [row[2:] for row in result["values"]] == [row[2:] for row in expected["values"]]
        torch.testing.assert_close(torch.tensor(result["values"]), torch.tensor(expected["values"]), atol=1e-5, rtol=0)
        assert torch.equal(result["targets"], expected["targets"])          # every item once, in dataset order
        torch.testing.assert_close(result["preds"], expected["preds"], atol=1e-5, rtol=0)
        assert result["valid_again"][1:] == result["values"][-1][2:]
        assert torch.equal(result["confusion"], expected["confusion"])     # Interpretation over the whole set
    learn_folder = str((out / "learn").resolve())
    written = {rank: {Path(p).name for p in ranks[rank]["writes"]} for rank in range(world_size)}
    writers = [rank for rank in range(world_size) if written[rank]]
    assert writers == [0], f"files written by rank(s) {writers} under {learn_folder}: {written}"
    finals = {p.name for p in Path(learn_folder).rglob("*") if p.is_file()}
    assert {"history.csv", "final.pth", "export.ck", "after.ck", "model_0.pth", "model_2.pth"} <= finals
    assert len((out / "learn" / "history.csv").read_text().splitlines()) == N_EPOCH + 1
    exported = load_learner(out / "learn" / "export.ck", device="cpu")
    for name, tensor in exported.model.state_dict().items():
        torch.testing.assert_close(tensor, ranks[0]["weights"][name])


def test_two_processes_train_as_one_with_the_combined_batch(tmp_path):
    out = tmp_path / "job"
    done = run_job(torchrun("--standalone", "--nproc_per_node", "2", __file__, "train", str(out)))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    check_against_reference(out, tmp_path)
    printed = done.stdout
    assert printed.count("train_loss") == 1, printed    # one progress table: rank 0's


def test_two_machines_simulated_on_one(tmp_path):
    out = tmp_path / "job"
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    for node_rank in (0, 1):
        command = torchrun("--nnodes", "2", "--node_rank", str(node_rank), "--nproc_per_node", "1",
                           "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "coursekit-two-nodes",
                           "--rdzv-conf", f"is_host={node_rank == 0}", __file__, "train", str(out))
        nodes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=environment(), cwd=ROOT))
    outputs = [node.communicate(timeout=LAUNCH_TIMEOUT) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stdout[-3000:] + stderr[-5000:]
    check_against_reference(out, tmp_path)


@pytest.fixture(scope="module")
def killed_job(tmp_path_factory):
    "A two-process job whose rank 1 is killed (SIGKILL) half way through epoch 1: its output and how long it took."
    out = tmp_path_factory.mktemp("killed") / "job"
    start = time.monotonic()
    crashed = run_job(torchrun("--standalone", "--nproc_per_node", "2", __file__, "train", str(out),
                               "--crash-rank", "1"))
    return out, crashed, time.monotonic() - start


def test_a_killed_rank_ends_the_job_with_its_error(killed_job):
    out, crashed, took = killed_job
    assert crashed.returncode != 0
    report = crashed.stdout + crashed.stderr
    assert "rank      : 1" in report and "Signal 9 (SIGKILL)" in report, report[-4000:]
    assert took < LAUNCH_TIMEOUT
    checkpoints = sorted(p.name for p in (out / "learn" / "models").glob("*.pth"))
    assert checkpoints == ["model_0.pth"], checkpoints   # epoch 1 died half way: epoch 0's checkpoint is the last
    restored = toy_learner(BS, out / "learn").load("model_0")
    saved = torch.load(out / "learn" / "models" / "model_0.pth", weights_only=True)["model"]
    for name, tensor in restored.model.state_dict().items():
        assert torch.equal(tensor, saved[name])


def test_the_killed_fit_resumes_on_every_rank(killed_job, tmp_path):
    "The same job, resumed from the last checkpoint on both ranks, ends where an uninterrupted one does."
    out, _, _ = killed_job
    resumed = run_job(torchrun("--standalone", "--nproc_per_node", "2", __file__, "train", str(out),
                               "--resume", "models/model_0.pth"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    check_against_reference(out, tmp_path)


LAUNCHED_SCRIPT = """
import torch
import torch.distributed as dist
from coursekit.distributed import notebook_launcher, num_distrib, rank_distrib, setup_distrib, teardown_distrib

def train(scale):
    torch.set_num_threads(1)
    setup_distrib(timeout_s=60)
    total = torch.tensor(float(rank_distrib() + 1) * scale)
    dist.all_reduce(total)
    teardown_distrib()
    return {"world_size": num_distrib(), "total": total.item()}

def fails(rank_that_fails):
    if rank_distrib() == rank_that_fails:
        raise ValueError(f"rank {rank_that_fails} found a bad batch")

if __name__ == "__main__":
    print(notebook_launcher(train, args=(10.,), num_processes=2))
    try:
        notebook_launcher(fails, args=(1,), num_processes=2)
    except Exception as err:
        print("raised:", type(err).__name__, "|", str(err).replace(chr(10), " "), "|", err.__notes__)
"""


def test_notebook_launcher_runs_a_function_defined_in_main(tmp_path):
    script = tmp_path / "launch.py"
    script.write_text(LAUNCHED_SCRIPT)
    done = run_job([sys.executable, str(script)], timeout=90)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "{'world_size': 2, 'total': 30.0}" in done.stdout, done.stdout
    assert "raised: ProcessRaisedException" in done.stdout and "rank 1 found a bad batch" in done.stdout
    assert "Traceback" in done.stdout and "Worker 1 of 2 raised the error above" in done.stdout


def test_notebook_launcher_from_a_jupyter_kernel(tmp_path, monkeypatch):
    cells = [textwrap.dedent("""
        import torch, torch.distributed as dist
        from coursekit.distributed import notebook_launcher, rank_distrib, setup_distrib, teardown_distrib
        def train(scale):
            torch.set_num_threads(1)
            setup_distrib(timeout_s=60)
            total = torch.tensor(float(rank_distrib() + 1) * scale)
            dist.all_reduce(total)
            teardown_distrib()
            return total.item()
        print("launched:", notebook_launcher(train, args=(2.,), num_processes=2))""")]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell) for cell in cells])
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    NotebookClient(notebook, timeout=90, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    shown = "".join(output.get("text", "") for output in notebook.cells[0].outputs)
    assert "launched: 6.0" in shown, notebook.cells[0].outputs


# ----------------------------------------------------------------------------------------------------------------
# Loaders that draw their own batches: tabular, text (sortish classifier batches), images with a cache and
# augmentation on the device. The same worker runs each case under torchrun (`python tests/test_distributed.py
# CASE OUT`) and, for the reference, in this process with the combined batch.

CASE_EPOCHS = 2


def tabular_learner_for(bs: int) -> Learner:
    "192 training and 61 validation rows of a synthetic table; a tabular model without batch-norm or dropout."
    generator = torch.Generator().manual_seed(2)
    n = 253
    age = torch.randn(n, generator=generator)
    height = torch.randn(n, generator=generator)
    colour = torch.randint(0, 3, (n,), generator=generator)
    label = ((age + 0.5 * height + (colour == 1).float() + 0.3 * torch.randn(n, generator=generator)) > 0.5).long()
    df = pd.DataFrame({"colour": [["red", "green", "blue"][int(c)] for c in colour], "age": age.numpy(),
                       "height": height.numpy(), "label": [["no", "yes"][int(v)] for v in label]})
    dls = TabularDataLoaders.from_df(df, ".", procs=[Categorify, FillMissing, Standardize], cat_names=["colour"],
                                     cont_names=["age", "height"], y_names="label", valid_idx=list(range(192, n)),
                                     bs=bs, device="cpu")
    set_seed(0)
    model = TabularModel(get_emb_sz(dls.processor), n_cont=2, out_sz=2, layers=[16], use_bn=False, bn_cont=False)
    return Learner(dls, model, metrics=[accuracy, error_rate], opt_func=torch.optim.SGD, lr=LR)


def imdb_frame() -> pd.DataFrame:
    "160 training and 61 validation reviews of the IMDB sample (through the mirror), cut to 400 characters."
    df = pd.read_csv(untar_data(URLs.IMDB_SAMPLE) / "texts.csv")
    train = df[~df["is_valid"]].head(160)
    valid = df[df["is_valid"]].head(61)
    both = pd.concat([train, valid], ignore_index=True)
    both["text"] = both["text"].str[:400]
    return both


def text_learner_for(bs: int, cache: Path) -> Learner:
    "A tiny AWD-LSTM classifier without dropout or batch-norm (so the maths of two processes is that of one)."
    dls = TextDataLoaders.from_df(imdb_frame(), text_col="text", label_col="label", valid_col="is_valid", bs=bs,
                                  n_workers=1, cache_dir=cache, device="cpu")
    set_seed(0)
    config = dict(awd_lstm_clas_config, emb_sz=16, n_hid=24, n_layers=1)
    learn = text_classifier_learner(dls, config=config, drop_mult=0.0, seq_len=24, metrics=[accuracy, error_rate])
    without_batch_norm(learn.model)
    learn.opt_func = torch.optim.SGD   # Adam would blow float rounding on tiny gradients up to whole steps
    learn.lr = LR
    return learn


def language_model_for(bs: int, cache: Path) -> Learner:
    "A tiny AWD-LSTM language model without dropout on the same reviews: streams of `bs` rows per process."
    dls = TextDataLoaders.from_df(imdb_frame(), text_col="text", label_col="label", valid_col="is_valid", is_lm=True,
                                  bs=bs, seq_len=16, n_workers=1, cache_dir=cache, device="cpu")
    set_seed(0)
    config = dict(awd_lstm_lm_config, emb_sz=16, n_hid=24, n_layers=1)
    learn = language_model_learner(dls, config=config, drop_mult=0.0, pretrained=False)
    learn.opt_func = torch.optim.SGD
    learn.lr = LR
    return learn


def without_batch_norm(model: torch.nn.Module):
    "Replace the batch-norm and dropout layers of `model` (the classifier's head) by identities, in place."
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, (torch.nn.BatchNorm1d, torch.nn.Dropout)):
                setattr(module, name, torch.nn.Identity())


def image_learner_for(bs: int) -> Learner:
    "64 MNIST-sample images (through the mirror), cached after their first epoch, with augmentation on the device."
    path = untar_data(URLs.MNIST_SAMPLE)
    fnames = sorted((path / "train" / "3").glob("*.png"))[:32] + sorted((path / "train" / "7").glob("*.png"))[:32]
    dls = ImageDataLoaders.from_name_func(path, fnames, lambda f: f.parent.name, valid_pct=0.25, seed=0,
                                          batch_tfms=aug_transforms(size=24), bs=bs, device="cpu", cache=True)
    set_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2))
    return Learner(dls, model, metrics=[accuracy], opt_func=torch.optim.SGD, lr=LR)


class CountSteps(Callback):
    "How many training batches this process took."
    def __init__(self):
        self.steps = 0

    def after_batch(self, learn):
        if learn.training:
            self.steps += 1


def predictions(learn: Learner, case: str) -> tuple:
    "`get_preds()`; for a language model (whose batches differ in length, which get_preds cannot stack) `validate()`."
    if case != "lm":
        return learn.get_preds()
    figures = learn.validate()
    return torch.tensor(figures), torch.tensor(figures[1])   # loss, accuracy, perplexity; accuracy exactly


class FirstEpochCache(Callback):
    "The indices of the items this process's training loader cached in the first epoch (its share of it)."
    def __init__(self):
        self.indices = []

    def after_train(self, learn):
        if learn.epoch == 0:
            self.indices = sorted(learn.dls.train._cached)


def build_case(case: str, bs: int, folder: Path) -> Learner:
    if case == "tabular":
        return tabular_learner_for(bs)
    if case == "text":
        return text_learner_for(bs, folder / f"tokens{os.environ.get('RANK', '')}")
    if case == "lm":
        return language_model_for(bs, folder / f"tokens{os.environ.get('RANK', '')}")
    return image_learner_for(bs)


def case_worker(case: str, out: Path):
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    learn = build_case(case, BS, out)
    steps = CountSteps()
    cache = FirstEpochCache()
    learn.add_cb(steps)
    if case == "images":
        learn.add_cb(cache)
    with learn.distrib_ctx():
        with learn.no_bar():
            learn.fit(CASE_EPOCHS)
        seed = learn.dls.train.sampler.seed
        preds, targets = predictions(learn, case)
    alone_preds, alone_targets = predictions(learn, case)   # the same weights, in this one process: what validation must give
    result = {"alone_preds": alone_preds, "alone_targets": alone_targets,
              "rank": rank, "seed": seed, "steps": steps.steps, "values": learn.recorder.values,
              "weights": weights(learn), "preds": preds, "targets": targets, "cached": cache.indices,
              "n_train": len(learn.dls.train.dataset)}
    torch.save(result, out / f"rank{rank}.pt")


def case_reference(case: str, seed: int, tmp_path: Path) -> dict:
    "One process, the combined batch, the same seeded permutations (the samplers of a world of one)."
    learn = build_case(case, BS * 2, tmp_path)
    learn.add_cb(EpochPermutation())
    steps = CountSteps()
    learn.add_cb(steps)
    for dl in learn.dls:
        dl.sampler = ShardSampler(0, 1, seed=seed)
    with learn.no_bar():
        learn.fit(CASE_EPOCHS)
    preds, targets = predictions(learn, case)
    return {"steps": steps.steps, "values": learn.recorder.values, "weights": weights(learn), "preds": preds,
            "targets": targets}


def run_case(case: str, tmp_path: Path) -> list:
    out = tmp_path / case
    done = run_job(torchrun("--standalone", "--nproc_per_node", "2", __file__, case, str(out)))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ranks = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    assert ranks[0]["seed"] == ranks[1]["seed"]
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0          # the same number of steps on every process
    return ranks


def check_validation_as_one(ranks: list):
    "Validation inside the context (gathered) gives what this one process gives with the same weights."
    for result in ranks:
        assert torch.equal(result["targets"], result["alone_targets"])
        torch.testing.assert_close(result["preds"], result["alone_preds"], atol=1e-6, rtol=0)


def check_trains_as_one(ranks: list, expected: dict):
    for result in ranks:
        assert result["steps"] == expected["steps"]
        for name, tensor in expected["weights"].items():
            torch.testing.assert_close(result["weights"][name], tensor, atol=1e-5, rtol=0)
        assert [row[2:] for row in result["values"]] == [row[2:] for row in expected["values"]]   # metrics exactly
        torch.testing.assert_close(torch.tensor(result["values"]), torch.tensor(expected["values"]), atol=1e-5, rtol=0)
        assert torch.equal(result["targets"], expected["targets"])          # every item once, in the loader's order
        torch.testing.assert_close(result["preds"], expected["preds"], atol=1e-5, rtol=0)


def test_a_tabular_learner_trains_as_one_process_with_the_combined_batch(tmp_path):
    ranks = run_case("tabular", tmp_path)
    check_validation_as_one(ranks)
    check_trains_as_one(ranks, case_reference("tabular", ranks[0]["seed"], tmp_path))


def test_a_text_classifier_with_sortish_batches_trains_as_one_process(tmp_path):
    """Sortish batches are made over the whole epoch and dealt, each padded to its combined batch's longest review:
    batch k of both processes is batch k of one process with twice the batch size, validation batches included.
    (An LSTM reads the padding before a review, so its predictions depend on how a batch is padded: they equal one
    process's with the combined validation batch, not with the per-process one.)"""
    ranks = run_case("text", tmp_path)
    check_trains_as_one(ranks, case_reference("text", ranks[0]["seed"], tmp_path / "reference"))


def test_a_language_model_trains_as_one_process_with_the_combined_rows(tmp_path):
    "The stream is cut into `bs` rows per process and the rows dealt: batch k of all = one process's with all the rows."
    ranks = run_case("lm", tmp_path)
    check_trains_as_one(ranks, case_reference("lm", ranks[0]["seed"], tmp_path / "reference"))


def test_cached_images_with_augmentation_on_the_device_are_shared_out(tmp_path):
    ranks = run_case("images", tmp_path)
    check_validation_as_one(ranks)
    n_train = ranks[0]["n_train"]
    cached = [set(result["cached"]) for result in ranks]
    assert cached[0] | cached[1] == set(range(n_train))    # in the first epoch the processes together saw every item,
    assert len(cached[0] & cached[1]) <= 1                 # each its own share (one repeat pads an odd count),
    assert [len(share) for share in cached] == [-(-n_train // 2)] * 2   # and each cached that share only


def main():
    parser = argparse.ArgumentParser(description="The worker torchrun runs for tests/test_distributed.py")
    parser.add_argument("mode", choices=["train", "tabular", "text", "lm", "images"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--crash-rank", type=int, default=None)
    parser.add_argument("--resume", default=None)
    options = parser.parse_args()
    options.out.mkdir(parents=True, exist_ok=True)
    if options.mode == "train":
        worker(options.out, options.crash_rank, options.resume)
    else:
        case_worker(options.mode, options.out)


if __name__ == "__main__":
    main()
