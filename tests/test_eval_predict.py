"""`runner eval` and `runner predict`: a trained run's model used again, preprocessed as at evaluation."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from conftest import builtin_registries, copy_store

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"


def stored(db: Path, sql: str, *args: object) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, args).fetchall()


# ------------------------------------------------------------------------------------------
# eval


def test_eval_recomputes_the_stored_test_metrics_exactly(run_cli, trained_tiny_run, tmp_path):
    db = copy_store(trained_tiny_run.db, tmp_path / "copy.db")
    run_id = trained_tiny_run.run_id
    test = dict(stored(db, "SELECT name, value FROM split_metrics WHERE run_id = ? AND split = 'test'", run_id))
    best_epoch, epochs_run = stored(db, "SELECT best_epoch, epochs_run FROM runs WHERE id = ?", run_id)[0]
    assert best_epoch == epochs_run  # the tested weights are the best checkpoint's

    result = run_cli("eval", run_id, "--db", db, "--format", "json")
    assert result.exit_code == 0, result.err
    evaluation = result.json()
    assert {"split", "loss", "accuracy", "f1_macro"} <= set(evaluation)
    assert evaluation["split"] == "test"
    assert evaluation["accuracy"] == test["accuracy"]
    assert evaluation["f1_macro"] == test["f1_macro"]
    assert evaluation["loss"] == test["loss"]

    shown = run_cli("show", run_id[:6], "--db", db, "--format", "json").json()
    assert shown["test_accuracy"] == test["accuracy"]  # existing keys untouched
    [listed] = shown["evaluations"]
    assert (listed["split"], listed["accuracy"], listed["checkpoint"], listed["overrides"]) == ("test", test["accuracy"], "best", [])


def test_eval_on_the_validation_split_matches_the_best_epoch(run_cli, trained_tiny_run, tmp_path):
    db = copy_store(trained_tiny_run.db, tmp_path / "copy.db")
    run_id = trained_tiny_run.run_id
    [(best_epoch,)] = stored(db, "SELECT best_epoch FROM runs WHERE id = ?", run_id)
    val = dict(stored(db, "SELECT name, value FROM epoch_metrics WHERE run_id = ? AND epoch = ?", run_id, best_epoch))

    result = run_cli("eval", run_id, "--db", db, "--split", "val", "--format", "json")
    assert result.exit_code == 0, result.err
    assert result.json()["accuracy"] == val["val_accuracy"]
    assert result.json()["loss"] == val["val_loss"]


def test_eval_on_other_data_is_stored_with_its_overrides(run_cli, trained_tiny_run, tmp_path):
    db = copy_store(trained_tiny_run.db, tmp_path / "copy.db")
    run_id = trained_tiny_run.run_id
    own = run_cli("eval", run_id, "--db", db, "--format", "json").json()
    other = run_cli("eval", run_id, "--db", db, "--set", "data.split.seed=7", "--format", "json")
    assert other.exit_code == 0, other.err
    assert other.json()["samples"] == own["samples"]  # same class sizes, another draw of test images
    assert other.json()["accuracy"] != own["accuracy"] or other.json()["loss"] != own["loss"]

    text = run_cli("eval", run_id, "--db", db, "--set", "data.split.seed=7")
    assert text.exit_code == 0 and f"accuracy {other.json()['accuracy']:.4f}" in text.out
    everything = run_cli("eval", run_id, "--db", db, "--split", "all", "--format", "json").json()
    sizes = run_cli("show", run_id, "--db", db, "--format", "json").json()["settings"]["split_sizes"]
    assert everything["samples"] == sum(sizes.values())  # train + val + test images of the run's classes
    evaluations = run_cli("show", run_id, "--db", db, "--format", "json").json()["evaluations"]
    assert [(e["split"], e["overrides"]) for e in evaluations] == [
        ("test", []), ("test", ["data.split.seed=7"]), ("test", ["data.split.seed=7"]), ("all", [])]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "model.name=resnet18"], "only data.* keys"),
        (["--set", "data.classes=[0, 1]"], "model.num_classes is 3 but the data has 2 classes"),
        (["--checkpoint", "worst"], "Invalid value for '--checkpoint'"),
    ],
)
def test_eval_refuses_bad_requests_in_one_line(run_cli, trained_tiny_run, tmp_path, args, message):
    db = copy_store(trained_tiny_run.db, tmp_path / "copy.db")
    result = run_cli("eval", trained_tiny_run.run_id, "--db", db, *args)
    assert result.exit_code == 2
    assert message in result.err
    assert "Traceback" not in result.err
    assert stored(db, "SELECT COUNT(*) FROM evaluations") == [(0,)]


def test_eval_names_a_missing_checkpoint(run_cli, trained_tiny_run, tmp_path):
    db = copy_store(trained_tiny_run.db, tmp_path / "copy.db")
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM checkpoints WHERE kind = 'best'")
    result = run_cli("eval", trained_tiny_run.run_id, "--db", db)
    assert result.exit_code == 2
    assert "has no best checkpoint on disk; it has a last checkpoint (--checkpoint last)" in result.err


# ------------------------------------------------------------------------------------------
# predict


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """A quickstart run (the article's CNN on the bundled digits), shortened to 2 epochs at lr 0.003."""
    from runner.execute import run_experiment
    from runner.store import Store

    directory = tmp_path_factory.mktemp("quickstart")
    store = Store(directory / "results.db")
    overrides = ["training.epochs=2", "training.optimizer.lr=0.003", "device=cpu"]
    outcome = run_experiment(QUICKSTART, overrides, store=store, registries=builtin_registries())
    return directory / "results.db", outcome.run_id


def write_held_out_digits(directory: Path, count: int) -> list[tuple[Path, int]]:
    """The first ``count`` images of the quickstart run's test split (seed 0, 70/15/15), as PNG files."""
    from PIL import Image

    from runner.data import stratified_split
    from runner.interfaces import DatasetRequest
    from runner.plugins.datasets import load_bundled_mnist

    dataset = load_bundled_mnist(DatasetRequest(name="mnist_bundled", options={}, base_dir="."))
    targets = dataset.targets.numpy()
    test = stratified_split(targets, (0.7, 0.15, 0.15), seed=0).test[:count]
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for index in test:
        path = directory / f"{index:04d}.png"
        Image.fromarray(dataset.images[index, 0].numpy(), mode="L").save(path)
        written.append((path, int(targets[index])))
    return written


@pytest.mark.slow  # trains a 2-epoch quickstart run (about 20 s on 2 idle cores)
def test_predict_ranks_the_true_class_first_on_held_out_digits(run_cli, quickstart_run, tmp_path):
    db, run_id = quickstart_run
    images = write_held_out_digits(tmp_path / "digits", 200)
    truth = {str(path): label for path, label in images}

    result = run_cli("predict", run_id, tmp_path / "digits", "--db", db, "--format", "json", "--top-k", "3")
    assert result.exit_code == 0, result.err
    predictions = result.json()
    assert sorted(p["path"] for p in predictions) == sorted(truth)
    class_names = [str(d) for d in range(10)]
    for p in predictions:
        probs = [t["prob"] for t in p["top"]]
        assert len(p["top"]) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(t["class"] in class_names for t in p["top"])
    correct = sum(p["top"][0]["class"] == str(truth[p["path"]]) for p in predictions)
    assert correct / len(predictions) >= 0.95, f"{correct}/200 ranked first"

    one = str(images[0][0])
    table = run_cli("predict", run_id, one, "--db", db, "--top-k", "1")
    assert table.exit_code == 0, table.err
    header, row = table.out.splitlines()
    assert header.split() == ["path", "class", "prob"]
    expected = next(p for p in predictions if p["path"] == one)["top"][0]
    assert row.split()[:2] == [one, expected["class"]]


@pytest.mark.slow
def test_predict_preprocesses_a_png_exactly_as_the_evaluation_data(quickstart_run, tmp_path):
    import torch
    from PIL import Image

    import runner

    db, run_id = quickstart_run
    [(path, _)] = write_held_out_digits(tmp_path / "one", 1)
    loaded = runner.load_model(run_id, db=db)
    from_png = loaded.preprocess(Image.open(path))
    from runner.plugins.datasets import load_bundled_mnist
    from runner.interfaces import DatasetRequest

    dataset = load_bundled_mnist(DatasetRequest(name="mnist_bundled", options={}, base_dir="."))
    as_in_training = loaded.transform(dataset.images[int(path.stem)])
    assert torch.equal(from_png, as_in_training.as_subclass(torch.Tensor))
    assert from_png.shape == (1, 28, 28) and from_png.dtype == torch.float32
    assert abs(float(from_png.mean()) - float(((dataset.images[int(path.stem)] / 255.0 - 0.1307) / 0.3081).mean())) < 1e-6


def test_predict_csv_and_colour_images(run_cli, trained_tiny_run, tmp_path):
    from PIL import Image

    rgb = tmp_path / "colour.jpg"
    Image.new("RGB", (28, 28), (255, 255, 255)).save(rgb)  # converted to the run's greyscale mode
    result = run_cli("predict", trained_tiny_run.run_id, rgb, "--db", trained_tiny_run.db, "--format", "csv", "-k", "2")
    assert result.exit_code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == "path,rank,class,prob"
    assert [line.split(",")[:2] for line in lines[1:]] == [[str(rgb), "1"], [str(rgb), "2"]]
    assert {line.split(",")[2] for line in lines[1:]} <= {"0", "1", "2"}


def bad_input(directory: Path, kind: str) -> Path:
    from PIL import Image

    if kind == "missing":
        return directory / "missing.png"
    if kind == "broken":
        (directory / "broken.png").write_bytes(b"not a png")
        return directory / "broken.png"
    if kind == "empty directory":
        (directory / "empty").mkdir()
        return directory / "empty"
    Image.new("L", (32, 32)).save(directory / "big.png")  # the tiny run's transforms do not resize
    return directory / "big.png"


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "no such file or directory"),
        ("broken", "cannot read it as an image"),
        ("empty directory", "no images in this directory"),
        ("wrong size", "the model takes (1, 28, 28)"),
    ],
)
def test_predict_refuses_bad_input_in_one_line(run_cli, trained_tiny_run, tmp_path, kind, message):
    result = run_cli("predict", trained_tiny_run.run_id, bad_input(tmp_path, kind), "--db", trained_tiny_run.db)
    assert result.exit_code == 2, result.out
    assert message in result.err
    assert len(result.err.strip().splitlines()) == 1
