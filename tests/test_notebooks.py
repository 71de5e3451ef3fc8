"""The shipped MNIST model, its figures and the notebooks.

The MNIST tests are skipped when ``pretrained/mnist_model.pt`` or the MNIST test
data is absent. The data is looked up in ``$VQ_DRAW_DATA``, then in
``../shared/data`` beside the repository (a torchvision root holding MNIST/).
Notebooks run headless in quick mode (``VQ_DRAW_QUICK=1`` shrinks their data);
``mnist_demo.ipynb`` also runs with no data and downloads blocked, and
``svhn_demo.ipynb`` (no SVHN model ships) on an SVHN model made in the test. Without a
model (svhn_demo) or data (mnist_classify) a notebook ends cleanly after one printed line.
"""

import glob
import os

import pytest
import torch

from vq_draw import load_model
from vq_draw.checkpoint import CHECKPOINT_FORMAT
from vq_draw.data import load_dataset
from conftest import mnist_test_root

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "pretrained", "mnist_model.pt")
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "mnist_*.ipynb")))  # the shipped model's
SVHN_DEMO = os.path.join(ROOT, "svhn_demo.ipynb")


needs_model = pytest.mark.skipif(not os.path.exists(MODEL), reason="pretrained/mnist_model.pt is absent")


@pytest.fixture(scope="module")
def data_dir():
    folder = mnist_test_root()
    if folder is None:
        pytest.skip("MNIST test data not found ($VQ_DRAW_DATA or ../shared/data)")
    return folder


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL)


@needs_model
def test_shipped_file_is_weights_and_config_only():
    ckpt = torch.load(MODEL, map_location="cpu", weights_only=True)
    assert ckpt["format"] == CHECKPOINT_FORMAT
    assert ckpt["config"]["dataset"] == "mnist"
    assert not {"optimizer", "rng"} & set(ckpt), "training state in the shipped file"
    assert os.path.getsize(MODEL) < 10 * 2 ** 20


@needs_model
def test_shipped_model_reconstructs_test_digits(model, data_dir):
    assert (model.num_stages, model.options) == (10, 64)
    images = load_dataset("mnist", "test", data_dir, download=False).batch(torch.arange(64))
    x = model.normalize(images)
    codes, recons = model.encode(x, return_all=True)
    mse = (recons - x.unsqueeze(1)).pow(2).mean((2, 3, 4)).mean(0)  # [S]
    # An untrained model stays near the MSE of a blank image (about 1); the published
    # model reaches 0.0765, a partially trained one somewhere in between.
    blank = x.pow(2).mean().item()
    assert mse[-1] < 0.5, f"final MSE {mse[-1]:.3f} on real test digits"
    assert mse[-1] < 0.5 * blank
    assert mse[4] < mse[0] and mse[-1] < mse[4], f"stages do not improve: {mse.tolist()}"
    assert torch.equal(model.decode(codes), recons[:, -1])


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def _shipped_steps():
    return torch.load(MODEL, map_location="cpu", weights_only=True)["trained_steps"]


@needs_model
def test_readme_shows_the_shipped_models_evaluation():
    """The README's evaluation table is the one saved in images/mnist_eval.json, and its status
    names the shipped model's training steps, so a model update cannot leave the README's numbers behind."""
    import json

    from vq_draw.evaluate import ORIGINAL_MNIST_MSE, format_table

    with open(os.path.join(ROOT, "images", "mnist_eval.json")) as f:
        result = json.load(f)
    readme = _readme()
    assert format_table(result, ORIGINAL_MNIST_MSE) in readme, \
        "README's evaluation table differs from images/mnist_eval.json"
    steps = _shipped_steps()
    assert f"trained for {steps:,} steps" in readme, f"README does not name the shipped model's {steps:,} steps"


@needs_model
def test_codec_doc_shows_the_saved_rate_distortion_tables():
    """Both rate-distortion tables of docs/codec.md (greedy beside JPEG/WebP, and beam search)
    are what ``format_table`` prints for images/mnist_rate_distortion.csv."""
    from vq_draw.rate_distortion import format_table, read_csv

    tables = format_table(read_csv(os.path.join(ROOT, "images", "mnist_rate_distortion.csv")))
    with open(os.path.join(ROOT, "docs", "codec.md")) as f:
        doc = f.read()
    for table in tables.split("\n\n"):
        assert table in doc, "docs/codec.md's rate-distortion table differs from images/mnist_rate_distortion.csv"


@needs_model
def test_readme_shows_the_classifier_notebooks_accuracies():
    """The README's classifier table holds the accuracies that mnist_classify.ipynb printed in its
    saved summary, and that run used the shipped model."""
    import re

    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(os.path.join(ROOT, "mnist_classify.ipynb"), as_version=4)
    summary = [out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
               for out in cell.get("outputs", []) if "model trained" in out.get("text", "")]
    assert len(summary) == 1, "mnist_classify.ipynb is saved without its summary output"
    rows = re.findall(r"^(.+?)\s+(\d+\.\d\d)%\s+(\d+\.\d\d)%$", summary[0], re.M)
    assert len(rows) == 3, summary[0]
    readme = _readme()
    for name, train, test in rows:
        row = rf"\| {re.escape(name)} \| {train} % \| (\*\*)?{test} %(\*\*)? \|"
        assert re.search(row, readme), f"README's classifier table lacks: {name} {train} % {test} %"
    notebook_steps = int(re.search(r"model trained (\d+) steps", summary[0]).group(1))
    assert notebook_steps == _shipped_steps(), "mnist_classify.ipynb's outputs come from another model"
    assert f"model at step {notebook_steps:,}," in readme


@needs_model
def test_make_images_writes_every_figure(model, data_dir, tmp_path):
    from PIL import Image

    from vq_draw.tools.make_images import make_images

    dataset = load_dataset("mnist", "test", data_dir, download=False)
    paths = make_images(model, dataset, str(tmp_path), reconstructions=4, samples=4)
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["mnist_reconstructions.png", "mnist_samples_30bit.png",
                     "mnist_samples_60bit.png", "mnist_stages.png"]
    # The stage figure: 10 rows (one digit per class), S stages + the original as columns.
    assert Image.open(tmp_path / "mnist_stages.png").size == (11 * 30 + 2, 10 * 30 + 2)


def _notebook(path, monkeypatch, cwd=ROOT, **env):
    """(notebook, client) ready to execute ``path`` in a kernel started in ``cwd``.

    The kernel inherits this environment: the repository importable, the VQ_DRAW_* variables
    unset except those given in ``env``.
    """
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in ("VQ_DRAW_MODEL", "VQ_DRAW_DATA", "VQ_DRAW_QUICK", "VQ_DRAW_DIGITS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    return nb, client


def _run(path, monkeypatch, cwd=ROOT, **env):
    """Execute a notebook (raises CellExecutionError on the first failing cell); returns it."""
    nb, client = _notebook(path, monkeypatch, cwd, **env)
    client.execute()
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
              if o.output_type == "error"]
    assert not errors
    return nb


def _printed(cell):
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def _pngs(cell):
    return sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


def _code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def test_every_notebook_is_executed_by_a_test():
    assert {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.ipynb"))} == \
        {os.path.basename(p) for p in NOTEBOOKS} | {"svhn_demo.ipynb"}


@needs_model
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_runs(path, data_dir, monkeypatch):
    nb = _run(path, monkeypatch, VQ_DRAW_QUICK="1", VQ_DRAW_DATA=data_dir)
    if path.endswith("mnist_demo.ipynb"):
        printed = "".join(_printed(cell) for cell in _code_cells(nb))
        assert "MNIST test digits from" in printed and "skipping" not in printed
        assert "MSE (normalized space) of these 32 digits" in printed


# A proxy on a closed local port: urllib (torchvision's downloads) fails at once, whether or
# not the machine has internet. The kernel is another process, so the ``no_downloads``
# fixture's patches would not reach it; the proxy variables do.
BLOCKED = "http://127.0.0.1:9"


@needs_model
def test_mnist_demo_without_data_shows_what_needs_none(monkeypatch, tmp_path):
    """A fresh clone with no MNIST and no internet: the notebook tries ./data and the download
    (as the training scripts do), then shows samples, the hand-written code, the proposals and
    stage rows of random codes, and says in one line what it skipped and why."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, BLOCKED)
    nb = _run(os.path.join(ROOT, "mnist_demo.ipynb"), monkeypatch, cwd=tmp_path, VQ_DRAW_MODEL=MODEL)
    cells = _code_cells(nb)
    skipped = [line for line in _printed(cells[0]).splitlines() if "skipping" in line]
    assert len(skipped) == 1 and "could not be downloaded" in skipped[0], _printed(cells[0])
    assert not any(files for _, _, files in os.walk(tmp_path / "data")), "MNIST was downloaded"
    shown = [_pngs(cell) for cell in cells]
    # Samples (2), the hand-written code (2), its stage-3 proposals (1), random codes' stages (1);
    # nothing from the cells that need test digits.
    assert shown == [0, 0, 2, 2, 1, 1, 0, 0, 0], shown
    assert "picks option" in _printed(cells[4])


@pytest.fixture(scope="module")
def svhn_model(tmp_path_factory):
    """An untrained model of the published SVHN architecture (K = 64, 20 stages, 4 networks)."""
    from vq_draw import create_model
    from vq_draw.checkpoint import export_model

    torch.manual_seed(0)
    model = create_model("svhn")
    assert (model.options, model.num_stages, len(model.refiner.refiners)) == (64, 20, 4)
    path = tmp_path_factory.mktemp("svhn") / "svhn_model.pt"
    export_model(model, str(path))
    return str(path)


def _svhn_test_set(folder, count=6):
    """A synthetic test_32x32.mat in torchvision's layout (see ../shared/data/README.md)."""
    import numpy as np
    scipy_io = pytest.importorskip("scipy.io")

    rng = np.random.default_rng(0)
    scipy_io.savemat(os.path.join(folder, "test_32x32.mat"),
                     {"X": rng.integers(0, 256, (32, 32, 3, count), dtype=np.uint8),
                      "y": rng.integers(1, 11, (count, 1))})
    return str(folder)


def test_svhn_demo_runs_on_a_model_and_test_data(svhn_model, monkeypatch, tmp_path):
    nb = _run(SVHN_DEMO, monkeypatch, VQ_DRAW_QUICK="1", VQ_DRAW_MODEL=svhn_model,
              VQ_DRAW_DATA=_svhn_test_set(tmp_path))
    cells = _code_cells(nb)
    # Settings, the model; the hand-written code, its stages, its stage-3 proposals, random
    # codes, reconstructions.
    assert [_pngs(cell) for cell in cells] == [0, 0, 1, 1, 1, 1, 1, 0]
    assert not _printed(cells[0])
    assert "20 stages x 64 options = 120 bits" in _printed(cells[1])
    assert "picks option" in _printed(cells[4])
    assert "6 SVHN test images" in _printed(cells[6])


def test_svhn_demo_without_data_skips_only_the_reconstructions(svhn_model, monkeypatch, tmp_path):
    nb = _run(SVHN_DEMO, monkeypatch, cwd=tmp_path, VQ_DRAW_QUICK="1", VQ_DRAW_MODEL=svhn_model)
    cells = _code_cells(nb)
    assert [_pngs(cell) for cell in cells] == [0, 0, 1, 1, 1, 1, 0, 0]
    assert _printed(cells[6]).startswith("skipping the reconstructions of test images: svhn test data")
    assert len(_printed(cells[6]).splitlines()) == 1


def _only_output_is_one_line(nb):
    """The notebook's only output: one printed line in its first code cell; returns it."""
    first, *rest = _code_cells(nb)
    assert [o.output_type for o in first.outputs] == ["stream"], first.outputs
    assert not any(cell.outputs for cell in rest), "a cell after the stop ran"
    lines = _printed(first).splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_svhn_demo_without_a_model_stops_with_one_line(svhn_model, monkeypatch, tmp_path):
    """No model: nbclient ends without an error and the first cell says, in one line, where a
    model comes from; in the same kernel (as in Jupyter), the cells run again once it exists."""
    import shutil

    path = tmp_path / "svhn_model.pt"
    nb, client = _notebook(SVHN_DEMO, monkeypatch, cwd=tmp_path, VQ_DRAW_QUICK="1",
                           VQ_DRAW_MODEL=str(path))
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
        line = _only_output_is_one_line(nb)
        assert line.startswith(f"{path} does not exist")
        for words in ("python train_svhn.py", "python -m vq_draw.export runs/svhn/checkpoint.pt",
                      "python -m vq_draw.convert svhn_model.pt"):
            assert words in line
        # The first cell's explanation gives the same two ways.
        assert "python train_svhn.py" in nb.cells[0].source and "vq_draw.convert" in nb.cells[0].source

        shutil.copy(svhn_model, path)
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
    cells = _code_cells(nb)
    assert [_pngs(cell) for cell in cells] == [0, 0, 1, 1, 1, 1, 0, 0]
    assert "20 stages x 64 options = 120 bits" in _printed(cells[1])


@needs_model
def test_mnist_classify_without_data_stops_with_one_line(monkeypatch, tmp_path):
    """No MNIST and no internet: one line that names VQ_DRAW_DATA, no traceback, nothing else run."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, BLOCKED)
    nb = _run(os.path.join(ROOT, "mnist_classify.ipynb"), monkeypatch, cwd=tmp_path,
              VQ_DRAW_QUICK="1", VQ_DRAW_MODEL=MODEL)
    line = _only_output_is_one_line(nb)
    assert line.startswith("this notebook needs MNIST; set VQ_DRAW_DATA") and "could not be downloaded" in line
    assert not any(files for _, _, files in os.walk(tmp_path / "data")), "MNIST was downloaded"


@needs_model
def test_make_images_can_refresh_only_the_notebooks(monkeypatch, tmp_path):
    """``--notebooks --no-figures`` executes both MNIST notebooks with the given model and data
    and writes no figure (nor needs the data itself)."""
    import vq_draw.tools.make_images as make_images

    executed = []
    monkeypatch.setattr(make_images, "execute_notebook", lambda path: executed.append(
        (path, os.environ["VQ_DRAW_MODEL"], os.environ.get("VQ_DRAW_DATA"))))
    monkeypatch.chdir(ROOT)
    for name in ("VQ_DRAW_MODEL", "VQ_DRAW_DATA"):
        monkeypatch.setenv(name, "unchanged")  # main() sets them for the kernels; restored after
    data = tmp_path / "no_data_here"
    make_images.main(["--model", MODEL, "--data-dir", str(data), "--out", str(tmp_path / "figures"),
                      "--notebooks", "--no-figures"])
    assert executed == [(path, MODEL, str(data)) for path in make_images.NOTEBOOKS]
    assert not (tmp_path / "figures").exists()
