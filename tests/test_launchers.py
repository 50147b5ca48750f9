"""Launchers: a sweep's workers as a Slurm job array through submitit (its local executor: the same
code path, as local processes), and as Ray tasks on a local Ray cluster started by the test. Each
launcher only starts `runner worker` processes; the store holds the state.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from test_sweeps import METRICS_PER_EPOCH, cli, epoch_metrics, sweep_rows, wait_until, write_spec


def _four_runs(directory: Path, name: str, epochs: int = 1, **changes: Any) -> Path:
    return write_spec(directory, name=name, seeds=4, training={"epochs": epochs, "optimizer": {"name": "Adam", "lr": 0.003}}, **changes)


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_a_bad_launcher_section_is_one_line_naming_the_key(run_cli: Any, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, name="bad", seeds=2, launcher={"name": "slurm", "slurm_time": 0})
    result = run_cli("sweep", "run", spec, "--db", tmp_path / "results.db")
    assert result.exit_code == 2
    assert result.err.strip().startswith(f"error: {spec}: launcher.slurm_time: ") and "greater than or equal to 1" in result.err
    assert not (tmp_path / "results.db").exists()


@pytest.mark.slow
def test_the_slurm_launcher_runs_a_sweep_as_a_submitit_job_array_and_a_preempted_job_is_requeued_and_resumes_its_run(
    tmp_path: Path,
) -> None:
    pytest.importorskip("submitit", reason="submitit is not installed (pip install -e '.[slurm]')")
    epochs = 4
    spec = _four_runs(tmp_path, "slurm_sweep", epochs=epochs, data__train_per_class=60,
                      launcher={"name": "slurm", "jobs": 2, "slurm_cluster": "local", "slurm_time": 30, "slurm_folder": str(tmp_path / "jobs")})
    db = tmp_path / "results.db"
    sweep = cli("sweep", "run", spec, "--db", db, "-q", env={"OMP_NUM_THREADS": "1"})
    wait_until(lambda: any(r["status"] == "running" and r["epochs_run"] >= 1 for r in sweep_rows(db)) or sweep.poll() is not None,
               "a run in its second epoch", timeout=600)
    assert sweep.poll() is None, sweep.communicate()
    preempted = next(r for r in sweep_rows(db) if r["status"] == "running" and r["epochs_run"] >= 1)
    worker_pid = int(preempted["owner"].split(":")[1])
    os.kill(_parent_of(worker_pid), signal.SIGUSR2)  # what Slurm sends a job before preempting it or at its time limit

    out, err = sweep.communicate(timeout=900)
    assert sweep.returncode == 0, err[-3000:]
    rows = sweep_rows(db)
    assert [r["status"] for r in rows] == ["completed"] * 4
    attempts = {r["id"]: r["attempts"] for r in rows}
    assert attempts.pop(preempted["id"]) == 2 and set(attempts.values()) == {1}  # the preempted run was started twice
    metrics = epoch_metrics(db)
    assert all(len(metrics[r["id"]]) == epochs * METRICS_PER_EPOCH for r in rows)  # every epoch stored once, none twice
    logs = "".join(p.read_text(errors="replace") for p in sorted((tmp_path / "jobs").rglob("*_log.*")))
    assert "this job is preempted" in logs and "Requeued job" in logs  # submitit checkpointed and requeued the job


@pytest.mark.slow
def test_the_ray_launcher_runs_a_sweep_as_ray_tasks_on_a_local_cluster_and_leaves_nothing_in_the_home_directory(
    run_cli: Any, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    home = Path.home()
    before = _home_entries(home)
    started = time.time()
    ray_dir = tmp_path_factory.mktemp("ray")  # short: Ray's socket paths must stay under 107 characters
    monkeypatch.setenv("RAY_TMPDIR", str(ray_dir))
    # a new local cluster uses token authentication, with a token Ray would otherwise write to ~/.ray/auth_token
    monkeypatch.setenv("RAY_AUTH_TOKEN", uuid.uuid4().hex)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(ray_dir), log_to_driver=False)
    try:
        spec = _four_runs(tmp_path, "ray_sweep")
        db = tmp_path / "results.db"
        result = run_cli("sweep", "run", spec, "--db", db, "-q", "--launcher", "ray", "-j", "2", "--ray-num-cpus", "1")
        assert result.exit_code == 0, result.err
    finally:
        ray.shutdown()
    rows = sweep_rows(db)
    assert [r["status"] for r in rows] == ["completed"] * 4 and {r["attempts"] for r in rows} == {1}
    owners = {r["owner"].split(":")[1] for r in rows}
    assert len(owners) <= 2  # two worker tasks, each one `runner worker` process, took the runs
    assert all(len(m) == METRICS_PER_EPOCH for m in epoch_metrics(db).values())
    assert _new_ray_entries(home, before, started) == []


def _home_entries(home: Path) -> set[str]:
    return {str(p) for p in _walk(home, depth=3)}


def _walk(root: Path, depth: int) -> list[Path]:
    found: list[Path] = []
    try:
        children = list(root.iterdir())
    except OSError:
        return found
    for child in children:
        found.append(child)
        if depth > 1 and child.is_dir() and not child.is_symlink():
            found.extend(_walk(child, depth - 1))
    return found


def _new_ray_entries(home: Path, before: set[str], started: float) -> list[str]:
    """Paths under the home directory named for Ray that are new, or changed since the test began."""
    return sorted(str(p) for p in _walk(home, depth=3)
                  if "ray" in p.name.lower() and (str(p) not in before or p.stat().st_mtime >= started))


def test_an_unknown_launcher_key_names_the_closest_one(run_cli: Any, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, name="bad", seeds=2, launcher={"name": "slurm", "slurm_partitoin": "gpu"})
    result = run_cli("sweep", "plan", spec)
    assert (result.exit_code, result.err.strip()) == (2, f"error: {spec}: unknown key 'launcher.slurm_partitoin'; did you mean 'launcher.slurm_partition'?")
