"""The shipped MNIST model, its figures and the notebooks that use it.

Everything here is skipped when ``pretrained/mnist_model.pt`` or the MNIST test
data is absent. The data is looked up in ``$VQ_DRAW_DATA``, then in
``../shared/data`` beside the repository (a torchvision root holding MNIST/).
Notebooks run headless in quick mode (``VQ_DRAW_QUICK=1`` shrinks their data).
"""

import glob
import os

import pytest
import torch

from vq_draw import load_model
from vq_draw.checkpoint import CHECKPOINT_FORMAT
from vq_draw.data import DataError, load_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "pretrained", "mnist_model.pt")
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "*.ipynb")))


def mnist_dir():
    """The first candidate folder that holds the MNIST test set, or None."""
    for folder in (os.environ.get("VQ_DRAW_DATA"), os.path.join(ROOT, "..", "shared", "data")):
        if folder and os.path.isdir(folder):
            try:
                load_dataset("mnist", "test", folder, download=False)
                return os.path.abspath(folder)
            except DataError:
                continue
    return None


needs_model = pytest.mark.skipif(not os.path.exists(MODEL), reason="pretrained/mnist_model.pt is absent")


@pytest.fixture(scope="module")
def data_dir():
    folder = mnist_dir()
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
def test_readme_shows_the_saved_rate_distortion_tables():
    """Both README tables (greedy beside JPEG/WebP, and beam search) are what
    ``format_table`` prints for images/mnist_rate_distortion.csv."""
    from vq_draw.rate_distortion import format_table, read_csv

    tables = format_table(read_csv(os.path.join(ROOT, "images", "mnist_rate_distortion.csv")))
    readme = _readme()
    for table in tables.split("\n\n"):
        assert table in readme, "README's rate-distortion table differs from images/mnist_rate_distortion.csv"


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

    from vq_draw.make_images import make_images

    dataset = load_dataset("mnist", "test", data_dir, download=False)
    paths = make_images(model, dataset, str(tmp_path), reconstructions=4, samples=4)
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["mnist_reconstructions.png", "mnist_samples_30bit.png",
                     "mnist_samples_60bit.png", "mnist_stages.png"]
    # The stage figure: 10 rows (one digit per class), S stages + the original as columns.
    assert Image.open(tmp_path / "mnist_stages.png").size == (11 * 30 + 2, 10 * 30 + 2)


@needs_model
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_runs(path, data_dir, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # The kernel inherits this environment.
    monkeypatch.setenv("VQ_DRAW_QUICK", "1")
    monkeypatch.setenv("VQ_DRAW_DATA", data_dir)
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.delenv("VQ_DRAW_MODEL", raising=False)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": ROOT}})
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
              if o.output_type == "error"]
    assert not errors
