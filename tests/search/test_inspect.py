"""`front --plot`, `studies` and `show` on SQLite and PostgreSQL stores."""

import json

import matplotlib.image
import pytest

from tests.test_cli import cli, tiny_run_args


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path, tiny_model_dir, corpus):
    url = f"sqlite:///{tmp_path / 's.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    study = f"inspect-{request.param}"
    args = list(tiny_run_args(tiny_model_dir, corpus, "unused", "--trials", "5", "--study", study))
    args[args.index("--storage") + 1] = url
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return url, study


def test_studies_lists_counts_and_front(store, tmp_path):
    url, study = store
    result = cli("studies", "--storage", url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    header, _, *rows = result.stdout.splitlines()
    assert header.split() == [
        "study",
        "model",
        "budget",
        "complete",
        "rejected",
        "failed",
        "running",
        "waiting",
        "front",
    ]
    row = next(r.split() for r in rows if r.startswith(study + " "))
    assert int(row[3]) + int(row[4]) == 5 and row[6] == "0" and int(row[8]) >= 1  # finished = complete + rejected


def test_show_tells_everything_about_a_trial(store, tmp_path):
    url, study = store
    result = cli("show", "--storage", url, "--study", study, "--trial", "0", "--format", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    details = json.loads(result.stdout)
    assert details["proposed_by"] == "greedy stage 1"
    assert details["state"] == "COMPLETE" and len(details["removed_layers"]) == 1
    assert details["test_ppl_ratio"] > 0 and details["ppl_ratio"] > 0 and details["latency_ratio"] > 0
    table = cli("show", "--storage", url, "--study", study, "--trial", "0", cwd=tmp_path).stdout
    assert "removed_layers" in table and "greedy stage 1" in table
    missing = cli("show", "--storage", url, "--study", study, "--trial", "99", cwd=tmp_path)
    assert missing.returncode == 2 and "no trial 99" in missing.stderr


def test_front_plot_is_a_real_image(store, tmp_path):
    url, study = store
    png = tmp_path / "front.png"
    result = cli("front", "--storage", url, "--study", study, "--plot", str(png), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert image.std() > 0.01  # not a blank canvas
