"""The KFP pipeline compiles, its spec has the expected tasks and edges, and it runs locally."""

import json
import subprocess
import sys

import pytest
import yaml

from pipelines.craft_pipeline import compile_pipeline


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled") / "craft_pipeline.yaml"
    compile_pipeline(out)
    return list(yaml.safe_load_all(out.read_text()))[0]  # the 2nd document is the Kubernetes platform spec


def test_compiles_with_parameters(spec):
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"profile", "overrides", "dataset_uri"} <= set(params)
    assert params["profile"]["defaultValue"] == "demo-histo"


def test_task_graph(spec):
    tasks = spec["root"]["dag"]["tasks"]
    assert "prepare-data-op" in tasks and "validate-op" in tasks
    assert tasks["validate-op"]["dependentTasks"] == ["prepare-data-op"]
    assert set(tasks["annotate-op"]["dependentTasks"]) == {"prepare-data-op", "validate-op"}
    art = tasks["validate-op"]["inputs"]["artifacts"]["dataset"]["taskOutputArtifact"]
    assert art == {"outputArtifactKey": "dataset", "producerTask": "prepare-data-op"}


def test_components_use_pinned_image_and_install_nothing(spec):
    from components.images import CPU_IMAGE

    for name, ex in spec["deploymentSpec"]["executors"].items():
        container = ex["container"]
        assert container["image"] in (CPU_IMAGE,) or "craft-gpu" in container["image"], name
        assert "pip install" not in json.dumps(container["command"]), f"{name} installs packages at run time"


def test_cli_compile(tmp_path):
    out = tmp_path / "p.yaml"
    r = subprocess.run(
        [sys.executable, "-m", "craft.cli", "pipeline", "compile", "--output", str(out)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert next(yaml.safe_load_all(out.read_text()))["pipelineInfo"]["name"] == "craft"


def test_local_run_end_to_end(tmp_path):
    """The walking skeleton: kfp.local runs the pipeline on a small demo dataset."""
    from pipelines.local import run_local

    summary = run_local("demo-histo", ["data.n=48", "validate.min_per_class=2"], tmp_path / "runs")
    assert summary["ok"]
    tasks = {t["task"]: t for t in summary["tasks"]}
    assert tasks["prepare-data-op"]["metrics"]["n_images"] == 48
    assert tasks["validate-op"]["metrics"]["n_failures"] == 0
    assert any(r.endswith("report") or r.endswith(".html") for r in summary["reports"])


def test_local_run_stops_on_invalid_dataset(tmp_path):
    """An invalid dataset fails the validate task, so nothing downstream runs."""
    from pipelines.local import run_local

    with pytest.raises(RuntimeError):
        run_local("demo-histo", ["data.n=48", "validate.min_per_class=1000"], tmp_path / "runs")
