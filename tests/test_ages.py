"""One grammar for ``report --since`` and ``prune --older-than``: ages (30m, 12h, 7d, 2w) and ISO dates."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from runner.ages import AgeError, cutoff
from runner.store import Store, utcnow

NOW = datetime(2026, 3, 15, 12, 0, 0)
AGES = {"45s": timedelta(seconds=45), "30m": timedelta(minutes=30), "90m": timedelta(minutes=90), "12h": timedelta(hours=12),
        "7d": timedelta(days=7), "2w": timedelta(weeks=2), "3": timedelta(days=3), "1.5": timedelta(days=1.5),
        " 2 w ": timedelta(weeks=2)}
DATES = {"2026-01-31": datetime(2026, 1, 31), "2026-01-31T12:00": datetime(2026, 1, 31, 12),
         "2026-01-31 12:00:30": datetime(2026, 1, 31, 12, 0, 30), "2026-01-31T12:00Z": datetime(2026, 1, 31, 12),
         "2026-01-31T12:00+02:00": datetime(2026, 1, 31, 10)}  # an offset is converted: the store keeps naive UTC
BAD = ["soon", "last tuesday", "-3d", "7 days", "2026-13-01", "12x", ""]
OPTIONS = ("--since", "--older-than")


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize(("text", "age"), AGES.items())
def test_an_age_counts_back_from_now(option: str, text: str, age: timedelta) -> None:
    assert cutoff(text, option, NOW) == NOW - age


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize(("text", "moment"), DATES.items())
def test_an_iso_date_is_a_utc_moment(option: str, text: str, moment: datetime) -> None:
    assert cutoff(text, option, NOW) == moment


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("text", BAD)
def test_anything_else_is_a_one_line_error_naming_the_option(option: str, text: str) -> None:
    with pytest.raises(AgeError) as raised:
        cutoff(text, option, NOW)
    message = str(raised.value)
    assert message.startswith(f"{option} {text!r}: ") and "2w" in message and "2026-01-31" in message
    assert "\n" not in message


# ------------------------------------------------------------------------------------------
# Both options on the command line, every form


def fake_completed_run(store: Store, run_id: str, started_days_ago: float, checkpoint: Path) -> None:
    """A completed run (no torch) that started and ended ``started_days_ago`` days ago, with one extra checkpoint."""
    started = utcnow() - timedelta(days=started_days_ago)
    store.runs.create(run_id, name="aged", spec_yaml="", spec_json="{}", spec_hash="-", model="cnn", strategy="full_finetune",
                      dataset="mnist_bundled", seed=0, started_at=started)
    store.runs.finish(run_id, "completed")
    store.runs.update(run_id, ended_at=started + timedelta(minutes=1))
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(b"weights")
    store.runs.save_checkpoint(run_id, "best", 1, checkpoint, "-", 7)
    store.runs.save_checkpoint(run_id, "last", 1, checkpoint.with_name("last.pt"), "-", 7)
    checkpoint.with_name("last.pt").write_bytes(b"weights")


@pytest.fixture
def aged_store(tmp_path: Path) -> Path:
    """Two completed runs: one three weeks old, one started now."""
    db = tmp_path / "results.db"
    store = Store(db)
    fake_completed_run(store, "old000000000", 21, tmp_path / "runs" / "old000000000" / "best.pt")
    fake_completed_run(store, "new000000000", 0, tmp_path / "runs" / "new000000000" / "best.pt")
    return db


def reported(run_cli: Any, db: Path, since: str) -> set[str]:
    result = run_cli("report", "--db", db, "--since", since, "--format", "json")
    assert result.exit_code == 0, result.err
    return {row["id"] for row in result.json()}


def pruned(run_cli: Any, db: Path, older_than: str) -> set[str]:
    result = run_cli("prune", "--db", db, "--older-than", older_than, "--dry-run", "--format", "json")
    assert result.exit_code == 0, result.err
    return set(result.json()["runs_pruned"])


def test_report_since_two_weeks(run_cli: Any, aged_store: Path) -> None:
    assert reported(run_cli, aged_store, "2w") == {"new000000000"}
    assert reported(run_cli, aged_store, "4w") == {"old000000000", "new000000000"}


@pytest.mark.parametrize(("text", "days"), [("30s", 0), ("90m", 0), ("12h", 0), ("7d", 7), ("2w", 14), ("20", 20), ("22", 22)])
def test_both_options_take_every_age(run_cli: Any, aged_store: Path, text: str, days: int) -> None:
    old_side = {"old000000000"} if days < 21 else set()  # the old run is 21 days old
    assert reported(run_cli, aged_store, text) == {"new000000000", "old000000000"} - old_side
    assert pruned(run_cli, aged_store, text) == old_side


@pytest.mark.parametrize("form", ["%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S+00:00"])
def test_both_options_take_every_iso_form(run_cli: Any, aged_store: Path, form: str) -> None:
    between = (utcnow() - timedelta(days=7)).strftime(form)  # after the old run, before the new one
    assert reported(run_cli, aged_store, between) == {"new000000000"}
    assert pruned(run_cli, aged_store, between) == {"old000000000"}


@pytest.mark.parametrize("option", ["--since", "--older-than"])
def test_a_bad_age_is_a_one_line_error_from_either_command(run_cli: Any, aged_store: Path, option: str) -> None:
    command = "report" if option == "--since" else "prune"
    result = run_cli(command, "--db", aged_store, option, "fortnight")
    assert result.exit_code == 2
    assert result.err.startswith(f"error: {option} 'fortnight': give an age such as 30m, 12h, 7d or 2w")
    assert result.err.count("\n") == 1
