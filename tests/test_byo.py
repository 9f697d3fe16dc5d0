"""Bring your own images (issue 19): an ImageFolder with no captions, mixed formats, modes and sizes ->
`craft data import` -> the plan check (`craft validate DATASET --config custom`) -> the whole pipeline.

The plan check reads dataset.yaml and the manifest only, so it fails in seconds naming each missing piece
and the flag that provides it; in the pipeline it runs in the validate step, which is never retried, so a
bad config fails once and no training step starts. The slow test runs the `custom` profile at toy size
under kfp.local to the gate's decision, with the generic modality annotated by a scripted MLLM server.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.annotate_server import ScriptedServer, chat_reply

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("amber", "slate", "moss")  # not medical: the generic modality `other`
FORMATS = [("png", "RGB"), ("jpg", "RGB"), ("png", "L"), ("png", "RGBA")]


def make_folder(root: Path, per_class: int = 8, seed: int = 0) -> Path:
    """SRC/<class>/*.png|jpg: RGB, grey and transparent images of 40-90 px, no captions anywhere."""
    rng = np.random.default_rng(seed)
    base = {"amber": (200, 140, 40), "slate": (70, 80, 100), "moss": (60, 120, 50)}
    for c in CLASSES:
        d = root / c
        d.mkdir(parents=True)
        for i in range(per_class):
            ext, mode = FORMATS[i % len(FORMATS)]
            w, h = (int(v) for v in rng.integers(40, 91, size=2))
            arr = np.clip(np.array(base[c]) + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
            im = Image.fromarray(arr, "RGB")
            if mode == "L":
                im = im.convert("L")
            elif mode == "RGBA":
                alpha = np.full((h, w), 255, np.uint8)
                alpha[: h // 4] = 0  # a transparent band: composited on white at import
                im = Image.fromarray(np.dstack([arr, alpha]), "RGBA")
            im.save(d / f"{c}_{i:02d}.{ext}", quality=90) if ext == "jpg" else im.save(d / f"{c}_{i:02d}.{ext}")
    return root


def craft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "craft.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def mllm_script(n, req):
    """A scripted MLLM: a schema-valid answer for whatever JSON schema the request carries (checklist or prompt)."""
    schema = req.response_format["json_schema"]["schema"]
    props = schema["properties"]
    if "label" not in props:  # a checklist request: every class, five attributes
        obj = {c: [{"attribute": a, "description": f"the usual {a.lower()} of this subject"}
                   for a in spec["items"]["properties"]["attribute"]["enum"]] for c, spec in props.items()}  # fmt: skip
        return chat_reply(json.dumps(obj))
    obj = {}
    for k, p in props.items():
        if "enum" in p:
            obj[k] = p["enum"][0]
        elif p.get("type") == "array":
            obj[k] = [p["items"]["enum"][0]]
        else:
            obj[k] = "an evenly lit picture with a grainy surface"
    return chat_reply(json.dumps(obj))


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "my-photos")


def test_import_mixed_folder_states_modality_resolution_and_captions(folder, tmp_path):
    """--modality, --resolution and --captions land in dataset.yaml and the files: RGB, RxR, a caption per image."""
    from craft.data.manifest import read_manifest, read_meta

    r = craft("data", "import", "imagefolder", str(folder), "--out", str(tmp_path / "ds"), "--modality", "other",
              "--resolution", "32", "--captions", "label")  # fmt: skip
    assert r.returncode == 0, r.stderr
    meta, df = read_meta(tmp_path / "ds"), read_manifest(tmp_path / "ds")
    assert (meta.modality, meta.resolution, meta.mode, meta.classes) == ("other", 32, "RGB", sorted(CLASSES))
    assert "resized to a 32 px short side (Lanczos) and centre-cropped to 32x32" in meta.description
    assert len(df) == 24 and set(df["caption"]) == {f"image of {c}" for c in CLASSES}
    for p in df["image_path"]:
        with Image.open(tmp_path / "ds" / p) as im:
            assert (im.mode, im.size) == ("RGB", (32, 32)), p
    rgba = df[df["image_id"].str.endswith("_03")]["image_path"].iloc[0]  # index 3: the RGBA source
    top = np.asarray(Image.open(tmp_path / "ds" / rgba))[0]
    assert top.min() > 240, "a transparent band must become white, not black"


def test_plan_check_names_every_missing_piece_and_its_fix(folder, tmp_path):
    """The issue's session: plain import, then `craft validate --config custom` fails naming captions, size,
    annotation backend and checklist writer, each with its flag; the right flags make the plan pass."""
    from craft.plan import check_plan

    assert craft("data", "import", "imagefolder", str(folder), "--out", str(tmp_path / "plain")).returncode == 0
    r = craft("validate", str(tmp_path / "plain"), "--config", "custom")
    assert r.returncode == 2, r.stderr  # bad input: the exit status a retry never follows
    err = " ".join(r.stderr.split())
    assert "weak captions: 12 of 12 train images have none" in err, err
    assert "--captions label" in err and "pretrain.captions=class" in err
    assert "--resolution 64" in err  # native sizes vary
    assert "the offline backend measures histo, cxr only" in err and "annotate.backend=openai" in err
    assert "report" not in r.stdout  # the slow dataset checks did not run

    ok = tmp_path / "ok"
    assert craft("data", "import", "imagefolder", str(folder), "--out", str(ok), "--modality", "other",
                 "--resolution", "64", "--captions", "label").returncode == 0  # fmt: skip
    mllm = ["annotate.backend=openai", "annotate.model=m", "annotate.base_url=http://127.0.0.1:9/v1"]
    assert check_plan(ok, "custom", mllm) == []
    missing = check_plan(ok, "custom", [*mllm, "annotate.checklist=auto", "controlnet.enabled=true"])
    text = "\n".join(map(str, missing))
    assert "none bundled for dataset 'my-photos'" in text and "annotate.checklist=generate" in text
    assert "mask images (mask_path) for 12 of 12 train images" in text and "craft data import-paired" in text
    few = check_plan(ok, "custom", [*mllm, "validate.min_per_class=1"])
    assert few == []
    # the modality a schema exists for, the resolution the model is built at
    wrong = check_plan(ok, "custom", [*mllm, "pretrain.model.resolution=32"])
    assert any("pretrain.model.resolution=64" in m.fix for m in wrong)
    # the reward ensemble (issue 21): reward.ensemble must match the extra critics this pipeline trains
    ens = check_plan(ok, "custom", [*mllm, "reward.ensemble=2"])
    assert len(ens) == 1 and "pipeline.critic_ensemble=2" in ens[0].fix and "trains 0" in ens[0].piece
    assert check_plan(ok, "custom", [*mllm, "reward.ensemble=2", "pipeline.critic_ensemble=2"]) == []


def test_bad_config_run_fails_once_at_validate_naming_the_fix(folder, tmp_path, caplog, capfd, s3_env, monkeypatch):
    """The scheduled check (`craft retrain-if-new-data`, no KFP host: kfp.local, what `craft demo` runs too) starts
    the `custom` profile on the uncaptioned dataset: the validate task fails ONCE (no task retry, no annotate or
    training task started), its report and log name the flag that fixes it, and the verdict recorded for the
    version keeps the next check from starting it again (no run-level retry either)."""
    from craft.data import importers
    from craft.retrain import RetrainConfig, main
    from craft.storage.objectstore import ObjectStore, StorageConfig
    from craft.storage.registry import Registry
    from pipelines.client import local_run_starter

    root = f"s3://{s3_env.make_bucket('byo')}"
    monkeypatch.setenv("CRAFT_REGISTRY", root)  # where the validate step records its verdict
    registry = Registry(ObjectStore.from_env(StorageConfig()), root)
    ds = importers.main(importers.ImportConfig(modality="other", resolution=64), folder, tmp_path / "ds")
    cfg = RetrainConfig(model="mine", profile="custom", dataset=str(ds))
    start = local_run_starter(tmp_path / "runs")
    caplog.set_level(logging.INFO)
    first = main(cfg, registry, start)
    assert first.action == "invalid", first
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()], "the validate task was retried"
    (run_dir,) = (
        p for p in (tmp_path / "runs").iterdir() if p.is_dir() and p.name != "store" and not p.name.startswith(".")
    )
    tasks = {p.name for p in run_dir.iterdir() if p.is_dir()}
    assert not {t for t in tasks if t.startswith(("annotate", "pretrain", "finetune"))}, tasks
    reports = [json.loads(p.read_text()) for p in run_dir.rglob("report.json")]
    assert reports and reports[0]["ok"] is False
    fixes = " ".join(f["fix"] for f in reports[0]["failures"])
    assert "--captions label" in fixes and "annotate.backend=openai" in fixes
    out = " ".join(capfd.readouterr().out.split())  # the validate task's log
    assert "fix: re-import with `craft data import ... --captions label`" in out
    assert "plan check of dataset my-photos" in out and "with profile custom: FAILED (s3://" in out

    second = main(cfg, registry, start)  # the next scheduled check
    assert second.action == "invalid" and "not retrying" in second.message, second
    assert len([p for p in (tmp_path / "runs").iterdir() if p.name.startswith("craft-")]) == 1  # no second run


def test_validate_task_has_no_retries_and_gpu_tasks_wait_for_it():
    """Compiled spec: validate carries no retry policy (its failures are deterministic), training tasks do."""
    import tempfile

    from kfp import compiler

    from pipelines.craft_pipeline import pipeline_for_profile

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "p.yaml"
        compiler.Compiler().compile(pipeline_for_profile("custom"), str(out))
        spec = next(doc for doc in yaml.safe_load_all(out.read_text()) if "root" in doc)
    tasks = spec["root"]["dag"]["tasks"]
    assert "retryPolicy" not in tasks["validate-op"]
    assert tasks["pretrain-op"]["retryPolicy"]["maxRetryCount"] >= 1
    assert "validate-op" in tasks["pretrain-op"]["dependentTasks"]


TOY = {  # plumbing, not quality: every stage runs a step or a few
    "encoder": {"epochs": 2},
    "probe": {"epochs": 5},
    "pretrain": {"autoencoder": {"steps": 10, "batch_size": 16},
                 "loop": {"steps": 4, "batch_size": 16, "warmup_steps": 1, "checkpoint_every": 0},
                 "sample_per_class": 0},
    "finetune": {"loop": {"steps": 4, "batch_size": 16, "warmup_steps": 1, "checkpoint_every": 0},
                 "sample_per_class": 0},
    "ti": {"loop": {"steps": 2, "batch_size": 8, "checkpoint_every": 0}},
    "ti_lora": {"loop": {"steps": 2, "batch_size": 8, "checkpoint_every": 0}},
    "reward": {"loop": {"steps": 1, "batch_size": 2, "checkpoint_every": 0}, "sample_steps": 2},
    "evaluate": {"max_prompts": 3, "steps": 2, "memorization": {"ssim_top_k": 4},
                 "downstream": {"prompts": 3, "scales": [1.0], "epochs": 1}, "preferences": {"bootstrap": 10}},
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(3600)  # a dozen kfp.local tasks; minutes on a quiet 2-core machine
def test_custom_profile_runs_an_imported_folder_to_a_gate_decision(folder, tmp_path):
    """import (--modality other --resolution 64 --captions label) -> plan check passes -> the whole `custom`
    pipeline at toy size under kfp.local, the generic modality annotated and its checklists generated by an
    (OpenAI-compatible, scripted) MLLM -> the gate decides: registered as candidate or refused."""
    from pipelines.local import run_local

    ds = tmp_path / "ds"
    assert craft("data", "import", "imagefolder", str(folder), "--out", str(ds), "--modality", "other",
                 "--resolution", "64", "--captions", "label").returncode == 0  # fmt: skip
    with ScriptedServer(script=mllm_script) as server:
        profile = tmp_path / "custom-toy.yaml"
        annotate = {"backend": "openai", "model": "scripted", "base_url": server.base_url, "checklist": "generate"}
        profile.write_text(yaml.safe_dump({"extends": "custom", **TOY, "annotate": annotate}))
        r = craft("validate", str(ds), "--config", str(profile))
        assert r.returncode == 0, r.stderr
        assert "plan check of profile" in r.stdout
        summary = run_local(str(profile), [], tmp_path / "runs", dataset_uri=str(ds))
    assert summary["ok"], summary
    status = {t["task"]: t["status"] for t in summary["tasks"]}
    assert status["gate-op"] == "ok" and status["annotate-op"] == "ok", status
    assert "registered" in summary["decision"] or "REFUSED by the gates" in summary["decision"], summary["decision"]
    checklists = json.loads(next(Path(summary["run_dir"]).rglob("checklists.json")).read_text())
    assert sorted(checklists) == sorted(CLASSES)


def test_a_mistyped_key_is_refused_before_any_run_starts(folder, tmp_path):
    """A bad override is named by the plan check (validate step, never retried) and `craft pipeline run` refuses it
    before contacting the host; each step would otherwise meet it only when it starts, and again on its retry."""
    from craft.config import ConfigError
    from craft.data import importers
    from craft.plan import check_plan
    from pipelines.client import run_params

    ds = importers.main(
        importers.ImportConfig(modality="other", resolution=64, captions="label"), folder, tmp_path / "d"
    )
    missing = check_plan(ds, "custom", ["pretrain.loop.stepz=10"])
    assert len(missing) == 1 and "pretrain.loop.stepz: unknown key" in str(missing[0]), missing
    with pytest.raises(ConfigError, match="pretrain.loop.stepz: unknown key"):
        run_params("custom", ["pretrain.loop.stepz=10"], "s3://b/datasets/mine")
    assert run_params("custom", ["pretrain.loop.steps=10"], "s3://b/datasets/mine")["overrides"]
