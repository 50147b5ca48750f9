"""runner report / compare / plot: filters, seed aggregation, exports, figures, the HTML report."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import TINY_SPEC, builtin_registries, torch_home_at

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONTRACT_KEYS = {"id", "name", "status", "seed", "model", "strategy", "epochs_run", "best_val_accuracy", "test_accuracy", "duration_s"}
SHORT_NAME = "tiny-short-run"


@dataclass
class SeedStore:
    db: Path | str  # a file, or a PostgreSQL URL
    seed_ids: list[str]  # the tiny spec at seeds 0, 1, 2
    short_id: str  # the tiny spec renamed, one epoch


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def seed_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SeedStore:
    """The tiny spec at seeds 0, 1, 2 (as ``--set seed=N``) plus one differently named one-epoch run,
    in an SQLite store and in a PostgreSQL one."""
    from runner.execute import run_experiment
    from runner.store import Store

    directory = tmp_path_factory.mktemp("seeds")
    db = directory / "results.db" if request.param == "sqlite" else request.getfixturevalue("postgres_server").new_database()
    with torch_home_at(directory):
        store = Store(db, artifacts=directory / "runs")
        seed_ids = [run_experiment(TINY_SPEC, [f"seed={seed}"], store=store, registries=builtin_registries()).run_id for seed in (0, 1, 2)]
        short_id = run_experiment(TINY_SPEC, [f"name={SHORT_NAME}", "training.epochs=1"], store=store, registries=builtin_registries()).run_id
    return SeedStore(db, seed_ids, short_id)


def _report(run_cli, store: SeedStore, *args: str) -> list[dict]:
    result = run_cli("report", "--db", store.db, "--format", "json", *args)
    assert result.exit_code == 0, result.err
    return result.json()


def _show(run_cli, db: Path, run_id: str) -> dict:
    result = run_cli("show", run_id, "--db", db, "--format", "json")
    assert result.exit_code == 0, result.err
    return result.json()


def _assert_png(path: Path) -> None:
    from PIL import Image

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.width > 100 and image.height > 100


# ------------------------------------------------------------------------------------------
# seeds as a group


def test_group_by_name_gives_mean_std_and_ci_of_the_seeds(run_cli, seed_store):
    from scipy import stats

    groups = {g["name"]: g for g in _report(run_cli, seed_store, "--group-by", "name")}
    assert set(groups) == {"tiny", SHORT_NAME}
    tiny = groups["tiny"]
    accuracies = [_show(run_cli, seed_store.db, run_id)["test_accuracy"] for run_id in seed_store.seed_ids]
    assert tiny["n"] == 3
    assert tiny["test_accuracy_mean"] == pytest.approx(statistics.mean(accuracies), rel=1e-12)
    assert tiny["test_accuracy_std"] == pytest.approx(statistics.stdev(accuracies), rel=1e-9)
    half_width = stats.t.ppf(0.975, df=2) * statistics.stdev(accuracies) / math.sqrt(3)
    assert tiny["test_accuracy_ci95"] == pytest.approx(half_width, rel=1e-9)
    for metric in ("best_val_accuracy", "test_loss", "test_f1_macro", "duration_s"):
        assert {f"{metric}_mean", f"{metric}_std", f"{metric}_ci95"} <= set(tiny)
    # one run: a mean, but no spread and no interval
    short = groups[SHORT_NAME]
    assert short["n"] == 1 and short["test_accuracy_std"] is None and short["test_accuracy_ci95"] is None
    assert short["test_accuracy_mean"] == pytest.approx(_show(run_cli, seed_store.db, seed_store.short_id)["test_accuracy"])


def test_t_quantile_matches_scipy_for_whole_degrees_of_freedom():
    from scipy.special import stdtrit

    from runner.reports import t_quantile

    for dof in [*range(1, 120), 999, 1000, 4096]:
        for probability in (0.975, 0.995, 0.9, 0.6, 0.025):
            assert t_quantile(probability, dof) == pytest.approx(float(stdtrit(dof, probability)), rel=1e-11), (dof, probability)
    assert t_quantile(0.975, 2) == pytest.approx(4.302652729749464, rel=1e-14)  # the half-width of three seeds
    assert math.isnan(t_quantile(0.975, 0))


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # scipy's, on the constant samples
def test_welch_p_value_matches_scipy_ttest_ind():
    import numpy as np
    from scipy.stats import ttest_ind

    from runner.reports import welch_p_value

    rng = np.random.default_rng(0)
    cases = [(rng.normal(0.9, 0.01, n), rng.normal(0.9 + shift, spread, m))
             for n, m, shift, spread in [(3, 3, 0.0, 0.01), (3, 5, 0.02, 0.03), (10, 2, 0.005, 0.001), (2, 2, 0.1, 0.05)]]
    cases += [([1.0, 1.0], [2.0, 2.0]), ([0.8, 0.9, 0.85], [0.8, 0.8, 0.8])]  # constant samples
    for first, second in cases:
        assert welch_p_value(first, second) == pytest.approx(float(ttest_ind(first, second, equal_var=False).pvalue), rel=1e-10, abs=1e-300)
    assert math.isnan(welch_p_value([1.0, 1.0], [1.0, 1.0]))


def test_a_grouped_report_does_not_import_scipy(seed_store):
    """The 95% interval's t quantile is computed in runner: scipy.special's import is a tenth of a big grouped report."""
    code = (
        "import sys\n"
        "from runner.cli import main\n"
        "try:\n"
        f"    main(['report', '--db', {str(seed_store.db)!r}, '--group-by', 'name', '--format', 'json'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "print('scipy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    groups = json.loads(out.stdout[:out.stdout.rindex("]") + 1])
    assert {g["name"] for g in groups} == {"tiny", SHORT_NAME}
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_frame_records_give_the_python_values_pandas_to_dict_gives():
    from runner.reports import frame_records

    frame = pd.DataFrame({
        "seed": pd.array([1, None, 3], dtype="Int64"),
        "accuracy": [0.5, float("nan"), 1 / 3],
        "name": pd.array(["a", None, "c"], dtype="str"),
        "lr": pd.Series([1e-3, "auto", None], dtype=object),  # a spec key holding numbers in some runs, text in others
        "frozen": [True, False, True],
    })
    expected = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
    records = frame_records(frame)
    assert records == expected
    assert [[type(v) for v in row.values()] for row in records] == [[type(v) for v in row.values()] for row in expected]
    assert records[1] == {"seed": None, "accuracy": None, "name": None, "lr": "auto", "frozen": False}
    assert frame_records(frame.head(0)) == []


def test_group_by_a_spec_key_with_columns_and_sort(run_cli, seed_store):
    rows = _report(run_cli, seed_store, "--group-by", "training.epochs", "--columns", "test_accuracy", "--sort", "-training.epochs")
    assert [(r["training.epochs"], r["n"]) for r in rows] == [(2, 3), (1, 1)]
    assert set(rows[0]) == {"training.epochs", "n", "test_accuracy_mean", "test_accuracy_std", "test_accuracy_ci95"}


# ------------------------------------------------------------------------------------------
# rows, filters, columns, sorting


def test_report_rows_hold_the_run_facts_that_show_holds(run_cli, seed_store):
    rows = {r["id"]: r for r in _report(run_cli, seed_store)}
    assert set(rows) == {*seed_store.seed_ids, seed_store.short_id}
    for run_id, row in rows.items():
        shown = _show(run_cli, seed_store.db, run_id)
        assert CONTRACT_KEYS <= set(row)
        for key in CONTRACT_KEYS:
            assert row[key] == shown[key], key
        assert row["best_epoch"] == shown["best_epoch"]
        assert row["stop_reason"] == shown["stop_reason"]
        assert row["weights_source"] is None  # trained from scratch
        assert row["test_loss"] == shown["test"]["loss"]
        assert row["test_f1_macro"] == shown["test"]["f1_macro"]
    assert rows[seed_store.short_id]["epochs_run"] == 1


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--where", "seed=1"), "seed1"),
        (("--where", "model.name=cnn", "--where", "training.epochs=2"), "seeds"),
        (("--where", "training.optimizer.lr=3e-3"), "all"),  # a number even where YAML reads text
        (("--where", "data.classes=[0, 1, 2]"), "all"),
        (("--where", "training.epochs=1"), "short"),
        (("--name", "tiny-*"), "short"),
        (("--name", "tiny"), "seeds"),
        (("--status", "failed"), "none"),
        (("--since", "2999-01-01"), "none"),
        (("--since", "1d"), "all"),
    ],
)
def test_filters(run_cli, seed_store, args, expected):
    ids = {r["id"] for r in _report(run_cli, seed_store, *args)}
    wanted = {
        "seed1": {seed_store.seed_ids[1]}, "seeds": set(seed_store.seed_ids), "short": {seed_store.short_id},
        "all": {*seed_store.seed_ids, seed_store.short_id}, "none": set(),
    }[expected]
    assert ids == wanted


def test_columns_may_name_spec_keys_and_sort_orders_rows(run_cli, seed_store):
    rows = _report(run_cli, seed_store, "--columns", "id,seed,training.optimizer.lr,test_accuracy", "--sort", "-test_accuracy")
    assert all(list(r) == ["id", "seed", "training.optimizer.lr", "test_accuracy"] for r in rows)
    assert all(r["training.optimizer.lr"] == 0.003 for r in rows)
    accuracies = [r["test_accuracy"] for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    rows = _report(run_cli, seed_store, "--sort", "seed,-name", "--columns", "seed,name")
    assert [(r["seed"], r["name"]) for r in rows] == [(0, SHORT_NAME), (0, "tiny"), (1, "tiny"), (2, "tiny")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--where", "training.nosuch=1"), "no stored run's resolved spec has the key 'training.nosuch'"),
        (("--columns", "id,bogus"), "unknown column 'bogus'"),
        (("--columns", "test_top5"), "unknown column 'test_top5'"),
        (("--sort", "-nope"), "unknown column 'nope'"),
        (("--group-by", "name", "--sort", "test_accuracy"), "unknown sort column 'test_accuracy'"),
        (("--since", "last tuesday"), "--since 'last tuesday': give an age such as"),
        (("--status", "done"), "not a run status"),
        (("--where", "seed"), "--where expects KEY=VALUE"),
        (("--format", "parquet"), "give -o FILE.parquet"),
        (("-o", "report.xyz"), "cannot tell the format"),
        (("-o", "missing/report.csv"), "does not exist"),
    ],
)
def test_bad_report_requests_are_one_line_errors(run_cli, seed_store, args, message):
    result = run_cli("report", "--db", seed_store.db, *args)
    assert result.exit_code == 2
    assert result.err.startswith("error: ") and message in result.err
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err
    assert not Path("missing").exists() and not Path("report.xyz").exists()


def test_report_on_a_missing_store_is_an_error(run_cli, tmp_path):
    result = run_cli("report", "--db", tmp_path / "none.db")
    assert result.exit_code == 2 and "no results store" in result.err


def test_a_failed_run_without_epochs_is_reported_and_plotted(run_cli, tmp_path):
    from runner.store import Store

    db = tmp_path / "failed.db"
    store = Store(db)
    run_id = store.runs.create(store.new_run_id(), name="broken", spec_yaml="", spec_json=json.dumps({"name": "broken", "seed": 3}),
                               spec_hash="0" * 64, model="cnn", strategy="full_finetune", dataset="mnist_bundled", seed=3)
    store.runs.finish(run_id, "failed", error="RuntimeError: boom", stop_reason="error")
    [row] = run_cli("report", "--db", db, "--format", "json").json()
    assert (row["status"], row["epochs_run"], row["stop_reason"], row["test_accuracy"], row["best_epoch"]) == ("failed", 0, "error", None, None)
    [group] = run_cli("report", "--db", db, "--format", "json", "--group-by", "name").json()
    assert group["n"] == 1 and group["test_accuracy_mean"] is None
    assert run_cli("plot", run_id, "--db", db, "-o", "failed.png").exit_code == 0
    _assert_png(Path("failed.png"))
    html = run_cli("report", "--db", db, "--format", "html")
    assert html.exit_code == 0 and "broken" in html.out and len(_images(html.out)) == 1


# ------------------------------------------------------------------------------------------
# formats


def _expected_table(db: Path, *args: str) -> pd.DataFrame:
    from runner import reports
    from runner.store import Store

    return reports.build_report(Store(db, create=False), reports.make_request(*args)).runs


@pytest.mark.parametrize(
    ("filename", "read"),
    [
        ("report.csv", lambda p: pd.read_csv(p, dtype={"id": str, "name": str})),
        ("report.json", lambda p: pd.DataFrame(json.loads(p.read_text()))),
        ("report.parquet", pd.read_parquet),
    ],
)
def test_exports_read_back_equal_the_table(run_cli, seed_store, filename, read):
    result = run_cli("report", "--db", seed_store.db, "-o", filename)  # the format comes from the extension
    assert result.exit_code == 0, result.err
    table = _expected_table(seed_store.db)
    back = read(Path(filename))
    assert list(back.columns) == list(table.columns)
    pd.testing.assert_frame_equal(
        back.astype(object).where(back.notna(), None), table.astype(object).where(table.notna(), None), check_dtype=False
    )
    if filename.endswith(".parquet"):  # a typed format keeps the types
        assert back["seed"].dtype.kind == "i" and back["test_accuracy"].dtype.kind == "f"


def test_text_formats_carry_the_same_columns(run_cli, seed_store):
    table = _expected_table(seed_store.db)
    for fmt in ("table", "markdown", "latex", "csv"):
        result = run_cli("report", "--db", seed_store.db, "--format", fmt)
        assert result.exit_code == 0, result.err
        text = result.out.replace("\\_", "_")  # LaTeX escapes underscores
        assert all(column in text for column in table.columns), fmt
        assert all(run_id in text for run_id in table["id"]), fmt
    latex = run_cli("report", "--db", seed_store.db, "-o", "r.tex")
    assert latex.exit_code == 0 and "test\\_accuracy" in Path("r.tex").read_text() and "\\begin{tabular}" in Path("r.tex").read_text()


def test_report_does_not_import_torch(seed_store, tmp_path):
    code = (
        "import sys\n"
        "from runner.cli import main\n"
        f"for args in (['report', '--db', {str(seed_store.db)!r}, '--group-by', 'name'],\n"
        f"             ['report', '--db', {str(seed_store.db)!r}, '-o', {str(tmp_path / 'r.html')!r}]):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, exc.code\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------------------------------
# compare and plot


def test_compare_shows_differing_spec_keys_beside_metrics(run_cli, seed_store):
    first, short = seed_store.seed_ids[1], seed_store.short_id
    result = run_cli("compare", first[:6], short, "--db", seed_store.db, "--format", "json", "-o", "curves.png")
    assert result.exit_code == 0, result.err
    comparison = result.json()
    assert comparison["runs"] == [first, short]
    assert set(comparison["differences"]) == {"name", "seed", "training.epochs"}
    assert comparison["differences"]["training.epochs"] == {first: 2, short: 1}
    for run_id in (first, short):
        assert comparison["metrics"]["test_accuracy"][run_id] == _show(run_cli, seed_store.db, run_id)["test_accuracy"]
    _assert_png(Path("curves.png"))
    text = run_cli("compare", first, short, "--db", seed_store.db)
    assert text.exit_code == 0 and "training.epochs" in text.out and "test_accuracy" in text.out
    assert "data.classes" not in text.out  # equal keys are left out


def test_compare_needs_two_runs(run_cli, seed_store):
    result = run_cli("compare", seed_store.short_id, seed_store.short_id[:5], "--db", seed_store.db)
    assert result.exit_code == 2 and "at least two different runs" in result.err


def test_plot_writes_a_valid_png(run_cli, seed_store):
    import matplotlib.image

    result = run_cli("plot", *seed_store.seed_ids[:2], "--db", seed_store.db, "-o", "runs.png")
    assert result.exit_code == 0, result.err
    _assert_png(Path("runs.png"))
    pixels = matplotlib.image.imread("runs.png")
    assert pixels.shape[0] > 300 and pixels.shape[1] > 300 and pixels.std() > 0.05


@pytest.mark.parametrize(("args", "message"), [(("nosuchrun", "-o", "p.png"), "no run 'nosuchrun'"), (("-o", "p.gif"), "cannot write a plot")])
def test_bad_plot_requests_are_one_line_errors(run_cli, seed_store, args, message):
    if args[0] == "-o":
        args = (seed_store.short_id, *args)
    result = run_cli("plot", *args, "--db", seed_store.db)
    assert result.exit_code == 2 and message in result.err
    assert not Path("p.png").exists() and not Path("p.gif").exists()


# ------------------------------------------------------------------------------------------
# the HTML report


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_html_report_is_one_self_contained_file(run_cli, seed_store):
    result = run_cli("report", "--db", seed_store.db, "--group-by", "name", "-o", "report.html")
    assert result.exit_code == 0, result.err
    html = Path("report.html").read_text()
    images = _images(html)
    assert len(images) == 1 + 4  # the overlay, then one figure per run
    assert all(image.startswith(PNG_SIGNATURE) for image in images)
    assert len(re.findall(r"<img ", html)) == len(images)  # every image is embedded
    assert not re.search(r"<script|<link|<iframe|@import|url\(|(src|href)=\"(?!data:)", html, re.IGNORECASE)
    assert "http://" not in html and "https://" not in html
    for run_id in (*seed_store.seed_ids, seed_store.short_id):
        assert f'id="run-{run_id}"' in html
    assert "test_accuracy_mean" in html and "test_accuracy_ci95" in html
    assert [p.name for p in Path(".").iterdir() if p.name != "report.html" and not p.name.startswith("torch_home")] == []


def test_html_report_limits_figures(run_cli, seed_store):
    result = run_cli("report", "--db", seed_store.db, "--format", "html", "--max-plots", "1")
    assert result.exit_code == 0
    assert len(_images(result.out)) == 1 and "first 1 of 4 runs" in result.out


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(_chromium() is None, reason="no Chromium installed (apt-get install chromium; .ci/run installs it)")
def test_html_report_renders_in_headless_chromium(run_cli, seed_store, tmp_path):
    from PIL import Image

    report = tmp_path / "report.html"
    assert run_cli("report", "--db", seed_store.db, "-o", report).exit_code == 0
    flags = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1600",
    ]
    screenshot = tmp_path / "shot.png"
    shot = subprocess.run([*flags, f"--screenshot={screenshot}", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert screenshot.exists(), shot.stderr[-2000:]
    dom = subprocess.run([*flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert "tiny" in dom.stdout and SHORT_NAME in dom.stdout
    assert all(run_id in dom.stdout for run_id in seed_store.seed_ids)
    with Image.open(screenshot) as image:
        pixels = image.convert("RGB")
        colours = pixels.getcolors(maxcolors=1 << 20) or []
        # the matplotlib figures are what brings saturated colour (plot lines, the Blues confusion map)
        saturated = sum(count for count, (r, g, b) in colours if max(r, g, b) - min(r, g, b) > 80)
    assert len(colours) > 50, "the screenshot is blank"
    assert saturated > 2000, "no figure was drawn in the screenshot"


# ------------------------------------------------------------------------------------------
# reading a report: what people open it for comes first, blanks stay blank


def test_html_tables_put_identity_and_metrics_first_text_left_numbers_right(run_cli, seed_store):
    html = run_cli("report", "--db", seed_store.db, "--group-by", "name", "--format", "html").out
    groups, runs = re.findall(r"<thead><tr>(.*?)</tr></thead>", html)
    runs_header = re.findall(r'<th class="(\w+)">(\w+)</th>', runs)
    assert [name for _, name in runs_header][:5] == ["id", "name", "status", "test_accuracy", "best_val_accuracy"]
    assert [name for _, name in runs_header][-3:] == ["weights_source", "stop_reason", "started_at"]
    kinds = dict((name, kind) for kind, name in runs_header)
    assert kinds["name"] == kinds["stop_reason"] == kinds["model"] == "text" and kinds["test_accuracy"] == kinds["seed"] == "num"
    assert [name for _, name in re.findall(r'<th class="(\w+)">(\w+)</th>', groups)][:4] == [
        "name", "n", "test_accuracy_mean", "test_accuracy_std"]
    short_run_row = next(row for row in re.findall(r"<tr>(.*?)</tr>", html) if f">{SHORT_NAME}<" in row and "<td" in row)
    assert "nan" not in short_run_row  # one run: no standard deviation, shown blank


def test_html_shortens_long_text_and_keeps_all_of_it_on_hover() -> None:
    import pandas as pd

    from runner.html_report import _table_html

    source = "run:ab12cd34ef56 (experiment experiments/vgg_pretrain.yaml)"
    html = _table_html(pd.DataFrame({"id": ["ab12cd34ef56"], "name": ["a-rather-long-experiment-name-kept-whole"],
                                     "weights_source": [source], "test_accuracy": [0.91234]}))
    assert f'<td class="text" title="{source}">{source[:27]}…</td>' in html
    assert ">a-rather-long-experiment-name-kept-whole<" in html and '<td class="num">0.9123</td>' in html


def test_markdown_group_report_leaves_the_std_and_ci_of_a_one_run_group_empty(run_cli, seed_store):
    result = run_cli("report", "--db", seed_store.db, "--group-by", "name", "--format", "markdown")
    assert result.exit_code == 0, result.err
    short = next(line for line in result.out.splitlines() if SHORT_NAME in line)
    assert "nan" not in short.lower()
    header = [c.strip() for c in result.out.splitlines()[0].strip("|").split("|")]
    cells = [c.strip() for c in short.strip("|").split("|")]
    assert cells[header.index("test_accuracy_std")] == "" and cells[header.index("test_accuracy_ci95")] == ""
    assert cells[header.index("n")] == "1" and cells[header.index("test_accuracy_mean")] != ""


def test_show_text_lists_the_plugins_and_the_trainable_parameters_of_every_stage(run_cli, tmp_path):
    db = tmp_path / "results.db"
    result = run_cli("run", TINY_SPEC, "--db", db, "-q", "--set", "training.strategy.name=gradual", "--set", "training.epochs=3")
    assert result.exit_code == 0, result.err
    text = run_cli("show", result.out.strip(), "--db", db).out
    details = _show(run_cli, db, result.out.strip())
    lines = {line[:18].strip(): line[18:].strip() for line in text.splitlines() if line[:2] != "  " and line.strip()}
    version = details["versions"]["runner"]
    assert lines["plugins"] == (f"runner-dl {version} (runner.plugins.datasets, runner.plugins.models, runner.plugins.strategies, "
                                f"runner.plugins.transforms)")
    stages = details["settings"]["model"]["stages"]
    assert len(stages) == 2 and stages[0]["params_trainable"] < stages[1]["params_trainable"]
    assert lines["params"] == f"{details['params']['total']:,} total; trainable by stage:"
    assert f"  epochs 1-1       {stages[0]['params_trainable']:,} trainable (\"head\")" in text.splitlines()
    assert f"  epochs 2-3       {stages[1]['params_trainable']:,} trainable (\"all\", backbone lr x0.1)" in text.splitlines()


def test_latex_and_markdown_tables_write_what_pandas_and_tabulate_write_cell_for_cell():
    """The column-wise writers (tabulate and Styler take seconds on 10,000 runs) against the libraries' own output."""
    import numpy as np
    import pandas as pd

    from runner.reports import latex_table, markdown_table

    frame = pd.DataFrame({
        "id": ["a_b", "c\\d", "e"], "test_accuracy": [0.91234567, np.nan, 1e-7],
        "epochs": pd.array([3, None, 12], dtype="Int64"), "n": [1, 2, 3], "name": ["x&y %$#{}~^", None, "plain"],
    })
    for rows in (frame, frame.iloc[:0]):
        assert latex_table(rows) == rows.to_latex(index=False, escape=True, na_rep="")

    def cells(markdown: str) -> list[list[str]]:
        return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if not line.startswith("|:")]

    tabulated = frame.astype(object).where(frame.notna(), None).to_markdown(index=False, missingval="")
    assert cells(markdown_table(frame)) == cells(tabulated)
    assert [line.endswith(":|") for line in markdown_table(frame).splitlines()[1:2]] == [False]  # text first: left
    assert markdown_table(frame).splitlines()[1].split("|")[2].endswith(":")  # numbers right-aligned
