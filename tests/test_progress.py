"""Progress in a notebook: one bar per `fit`, and a saved notebook shows the final state (issue 11, item 6).

Before, `ProgressCallback` opened a `tqdm.auto` widget for every epoch's training and every validation,
and a separate HTML table: the notebook kept a stack of bars, and the plain-text form a saved notebook
keeps (what GitHub or a notebook opened without its widget state shows) was each bar's `0%` at the moment
it was displayed. Now one object is displayed per fit and updated in place, text form included.

The first tests simulate a notebook (`coursekit.learner.in_notebook` says yes, `display` is recorded); the
last one runs a real Jupyter kernel through nbclient and reads the outputs it would save.
"""
import json
import os
import textwrap
from pathlib import Path

import nbformat
import pytest
import torch
import tqdm.std
from IPython.core.formatters import DisplayFormatter
from nbclient import NotebookClient
from torch.utils.data import TensorDataset

import coursekit
import coursekit.learner
from coursekit.data.core import DataLoaders
from coursekit.learner import Callback, Learner, simple_mlp

N_TRAIN_BATCHES = 4  # 64 items, bs 16
N_VALID_BATCHES = 2  # 32 items


def make_learner() -> Learner:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, generator=g)
    y = (x[:, 0] + x[:, 1] - x[:, 2] > 0).long()
    dls = DataLoaders.from_dsets(TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:]), bs=16, device="cpu",
                                 vocab=["neg", "pos"])
    torch.manual_seed(0)
    return Learner(dls, simple_mlp(3, 2, hidden=[8]), lr=1e-2)


class Handle:
    "A stand-in for IPython's DisplayHandle: keeps what each update showed."
    def __init__(self, shown):
        self.shown = [shown]

    def update(self, obj):
        self.shown.append(obj)

    def final_text(self) -> str:
        return DisplayFormatter().format(self.shown[-1])[0]["text/plain"]

    def final_html(self) -> str:
        return DisplayFormatter().format(self.shown[-1])[0].get("text/html", "")


class Notebook:
    "Records every display and every tqdm bar made while it is in place."
    def __init__(self):
        self.handles = []
        self.bars = 0

    def display(self, obj, display_id=None):
        self.handles.append(Handle(obj))
        return self.handles[-1]


@pytest.fixture
def notebook(monkeypatch) -> Notebook:
    recorded = Notebook()
    monkeypatch.setattr(coursekit.learner, "in_notebook", lambda: True)
    monkeypatch.setattr(coursekit.learner, "display", recorded.display)
    original = tqdm.std.tqdm.__init__

    def counting_init(bar, *args, **kwargs):  # tqdm.auto's notebook bar is a subclass: counted too
        recorded.bars += 1
        original(bar, *args, **kwargs)

    monkeypatch.setattr(tqdm.std.tqdm, "__init__", counting_init)
    return recorded


def test_one_display_and_one_bar_per_fit(notebook):
    learn = make_learner()
    learn.fit(3)
    assert len(notebook.handles) == 1, f"{len(notebook.handles)} outputs for one fit"
    assert notebook.bars == 1, f"{notebook.bars} progress bars for one fit"
    learn.fit_one_cycle(2)
    assert len(notebook.handles) == 2 and notebook.bars == 2


def test_the_text_a_saved_notebook_keeps_shows_the_final_state(notebook):
    learn = make_learner()
    learn.fit(3)
    total = 3 * (N_TRAIN_BATCHES + N_VALID_BATCHES)
    text = notebook.handles[0].final_text()
    lines = text.splitlines()
    assert "100%" in lines[0] and f"{total}/{total}" in lines[0], text
    assert "0%|" not in text.replace("100%|", "")
    assert lines[1].split() == ["epoch", "train_loss", "valid_loss", "time"]
    assert [line.split()[0] for line in lines[2:]] == ["0", "1", "2"], text
    page = notebook.handles[0].final_html()
    assert f'<progress value="{total}" max="{total}"' in page and page.count("<tr>") == 4


def test_an_interrupted_fit_shows_where_it_stopped(notebook):
    class CtrlC(Callback):
        def after_step(self, learn):
            if learn.epoch == 1 and learn.iter == 1:
                raise KeyboardInterrupt()
    learn = make_learner()
    with pytest.raises(KeyboardInterrupt):
        learn.fit(3, cbs=[CtrlC()])
    text = notebook.handles[0].final_text()
    done = N_TRAIN_BATCHES + N_VALID_BATCHES + 1  # the first epoch, then the first batch of the second
    total = 3 * (N_TRAIN_BATCHES + N_VALID_BATCHES)
    assert f"{done}/{total}" in text.splitlines()[0], text
    assert len(text.splitlines()) == 3, "the table holds the one finished epoch"
    assert not any(isinstance(cb, coursekit.learner.ProgressCallback) and cb.bar is not None for cb in learn.cbs)


def test_validate_and_get_preds_outside_a_fit_show_nothing(notebook):
    learn = make_learner()
    learn.validate()
    learn.get_preds()
    learn.predict(torch.zeros(3))
    assert notebook.handles == [] and notebook.bars == 0


def test_a_terminal_gets_one_plain_line_per_epoch(capsys):
    learn = make_learner()
    learn.fit(2)
    out = capsys.readouterr()
    assert out.out.splitlines()[0].split() == ["epoch", "train_loss", "valid_loss", "time"]
    assert len(out.out.splitlines()) == 3 and "\r" not in out.out + out.err


NOTEBOOK_CELL = textwrap.dedent("""
    import torch
    from torch.utils.data import TensorDataset
    from coursekit.data.core import DataLoaders
    from coursekit.learner import Learner, simple_mlp
    x = torch.randn(96, 3)
    y = (x[:, 0] > 0).long()
    dls = DataLoaders.from_dsets(TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:]), bs=16, device="cpu",
                                 vocab=["neg", "pos"])
    learn = Learner(dls, simple_mlp(3, 2, hidden=[8]))
    learn.fit(3)
""")


def test_a_notebook_saved_after_a_fit_in_a_real_kernel_shows_one_final_output(tmp_path):
    "The outputs Jupyter saves for a cell that calls `fit(3)`: one, updated to 100% and the whole table."
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(NOTEBOOK_CELL)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    checkout = str(Path(coursekit.__file__).parent.parent)  # the kernel imports the coursekit under test
    env = {**os.environ, "PYTHONPATH": checkout, "OMP_NUM_THREADS": "1"}
    client = NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)
    outputs = [output for output in nb.cells[0].outputs if output.output_type != "stream"]
    assert len(outputs) == 1, json.dumps(outputs, indent=1)[:3000]
    text = outputs[0].data["text/plain"]
    total = 3 * (N_TRAIN_BATCHES + N_VALID_BATCHES)
    assert "100%" in text and f"{total}/{total}" in text, text
    assert [line.split()[0] for line in text.splitlines()[2:]] == ["0", "1", "2"], text
    assert "application/vnd.jupyter.widget-view+json" not in outputs[0].data
