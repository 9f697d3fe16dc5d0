"""The MLOps loop as a user lives it, command by command (README "The three journeys"):

upload dataset v1 -> `craft retrain-if-new-data` trains and registers a candidate (production does not
move) -> `craft promote` (what CI runs) moves production -> a second check does nothing -> upload v2 (one
image changed) -> a run that read v2's files scores the candidate beside the production model in one
evaluation -> promote or refuse per the gates -> upload a corrupt v3 -> nothing trained or registered, the
failure recorded, the next check does not start it again -> `craft rollback` restores the previous version.

Real parts throughout: the `craft` CLI in subprocesses, SeaweedFS on loopback as the object store and
registry, kfp.local running the whole toy-histo pipeline (configs/toy-histo.yaml). Nothing is faked: with
no KFP_HOST the retrain check runs the pipeline on this machine, as it does for a user without a cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CRAFT = str(Path(sys.executable).parent / "craft")
PROFILE = "toy-histo"
MODEL = "toy-histo"


def craft(env: dict[str, str], *args: str, ok: bool | None = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([CRAFT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=3000,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    if ok is not None and (proc.returncode == 0) != ok:
        raise AssertionError(
            f"craft {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def last_line(proc: subprocess.CompletedProcess) -> str:
    """What the command concluded (kfp.local logs the pipeline's tasks on stdout before it)."""
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def models(env) -> dict:
    return json.loads(craft(env, "models", MODEL).stdout)


def upload(env, folder: Path, uri: str) -> str:
    out = craft(env, "store", "upload", str(folder), uri).stdout
    version = out.split(" version ")[1].split()[0]
    assert len(version) == 16, out
    return version


def run_dirs(root: Path) -> set[Path]:
    return (
        {p for p in root.iterdir() if p.is_dir() and p.name != "store" and not p.name.startswith(".")}
        if root.exists()
        else set()
    )


def read_ref(run_dir: Path) -> dict:
    refs = sorted(run_dir.rglob("dataset_ref.json"))
    assert refs, f"no dataset_ref.json under {run_dir}"
    return json.loads(refs[0].read_text())


@pytest.fixture
def loop_env(s3_env, tmp_path):
    bucket = s3_env.make_bucket("loop")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KFP_")}
    env.update(s3_env.env, CRAFT_REGISTRY=f"s3://{bucket}", HF_HUB_OFFLINE="1", GX_ANALYTICS_ENABLED="False")
    return env, f"s3://{bucket}/datasets/toy", tmp_path


def make_dataset(env, out: Path) -> Path:
    craft(env, "data", "demo", "--config", PROFILE, "--out", str(out))
    return out


def changed_copy(src: Path, dst: Path) -> tuple[Path, str]:
    """``src`` with one training image's pixels changed (a re-scanned slide, say)."""
    import shutil

    import pandas as pd

    shutil.copytree(src, dst)
    df = pd.read_parquet(dst / "manifest.parquet")
    row = df[df["split"] == "train"].iloc[0]
    img = np.array(Image.open(dst / row["image_path"]))
    img[:8, :8] = 255 - img[:8, :8]
    Image.fromarray(img).save(dst / row["image_path"])
    return dst, row["image_path"]


def corrupt_copy(src: Path, dst: Path) -> Path:
    """``src`` with one image truncated mid-file (an interrupted export)."""
    import shutil

    import pandas as pd

    shutil.copytree(src, dst)
    df = pd.read_parquet(dst / "manifest.parquet")
    f = dst / df.iloc[3]["image_path"]
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    return dst


def retrain(env, dataset_uri: str, root: Path, ok: bool | None = True) -> subprocess.CompletedProcess:
    return craft(env, "retrain-if-new-data", "--model", MODEL, "--profile", PROFILE, "--dataset", dataset_uri,
                 "--root", str(root), ok=ok)  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(5400)  # three whole-pipeline runs: about 3 min each on a quiet 2-core machine
def test_new_data_retrain_candidate_promote_rollback(loop_env):
    env, dataset_uri, tmp = loop_env
    root = tmp / "runs"

    # 1. dataset v1 lands; the check trains and registers a CANDIDATE; production does not move
    v1 = upload(env, make_dataset(env, tmp / "v1"), dataset_uri)
    before = run_dirs(root)
    out = last_line(retrain(env, dataset_uri, root))
    assert out.startswith("started:"), out
    (run1,) = run_dirs(root) - before
    assert read_ref(run1)["version"] == v1
    reg = models(env)
    assert reg["production"] is None and len(reg["versions"]) == 1
    c1 = reg["versions"][0]["version"]
    assert reg["aliases"]["candidate"]["version"] == c1
    lineage = reg["versions"][0]
    assert lineage["dataset"]["version"] == v1 and lineage["dataset"]["name"] == "toy"
    assert lineage["champion"] is None  # nothing in production yet: the candidate was evaluated alone

    # 2. CI promotes it; the history records who, why and which gates
    craft(env, "promote", MODEL, "--version", c1, "--reason", "journey test")
    reg = models(env)
    assert reg["production"]["version"] == c1
    assert reg["production"]["details"]["gates"]["file"].endswith(f"{PROFILE}.yaml")

    # 3. a second check does nothing
    before = run_dirs(root)
    assert last_line(retrain(env, dataset_uri, root)).startswith("up-to-date:")
    assert run_dirs(root) == before

    # 4. v2 (one image changed): a new run reads v2's files and scores the candidate beside production
    v2_dir, changed = changed_copy(tmp / "v1", tmp / "v2")
    v2 = upload(env, v2_dir, dataset_uri)
    assert v2 != v1
    before = run_dirs(root)
    out = retrain(env, dataset_uri, root, ok=None)
    (run2,) = run_dirs(root) - before
    ref = read_ref(run2)
    assert ref["version"] == v2 and ref["resolved_uri"].endswith(f"/toy/{v2}")
    data_dir = next(p.parent for p in run2.rglob("dataset_ref.json"))
    assert (data_dir / changed).read_bytes() == (v2_dir / changed).read_bytes()  # provably v2's bytes
    metrics = json.loads(next(p for p in run2.rglob("metrics.json") if "evaluate" in str(p)).read_text())
    assert metrics["champion"]["version"] == c1  # champion vs challenger, same evaluation
    assert set(metrics["variants"]) >= {"craft", "champion", "real"}
    decision = json.loads(next(run2.rglob("decision.json")).read_text())
    reg = models(env)
    if decision["passed"]:
        c2 = reg["aliases"]["candidate"]["version"]
        assert c2 != c1 and reg["production"]["version"] == c1  # registered, not promoted
        promote = craft(env, "promote", MODEL, "--version", c2, ok=None)
        if promote.returncode == 0:
            assert models(env)["production"]["version"] == c2
            # rollback restores the previous production version
            craft(env, "rollback", MODEL)
            reg = models(env)
            assert reg["production"]["version"] == c1 and reg["history"][-1]["action"] == "rollback"
        else:
            assert "refused" in promote.stderr
    else:
        assert decision["failures"], decision
        assert len(reg["versions"]) == 1  # refused: nothing registered

    # 5. a corrupt v3: nothing trained or registered, the failure recorded, never started again
    n_versions = len(models(env)["versions"])
    v3 = upload(env, corrupt_copy(tmp / "v1", tmp / "v3"), dataset_uri)
    out = retrain(env, dataset_uri, root, ok=None)
    assert last_line(out).startswith("invalid:"), out.stdout[-3000:] + out.stderr[-3000:]
    assert len(models(env)["versions"]) == n_versions
    before = run_dirs(root)
    again = last_line(retrain(env, dataset_uri, root))
    assert again.startswith("invalid:") and v3 in again
    assert run_dirs(root) == before


@pytest.mark.timeout(1800)
def test_data_lands_version_pinned_and_corrupt_version_never_retried(loop_env):
    """The fast variant (make test): the same commands with the run stopped after validation
    (`pipeline.until=validate`), so no model trains. A new version is claimed once, the run reads exactly the
    pinned version the check resolved, a later check does not start it again, and a corrupt version is
    refused by validation, recorded, and never started again."""
    env, dataset_uri, tmp = loop_env
    root = tmp / "runs"
    stop = ["pipeline.until=validate"]
    v1 = upload(env, make_dataset(env, tmp / "v1"), dataset_uri)
    assert upload(env, tmp / "v1", dataset_uri) == v1  # an identical re-upload is the same version
    out = last_line(craft(env, "retrain-if-new-data", "--model", MODEL, "--profile", PROFILE, "--dataset",
                          dataset_uri, "--root", str(root), *stop))  # fmt: skip
    assert out.startswith("started:") and v1 in out, out
    (run1,) = run_dirs(root)
    ref = read_ref(run1)
    assert ref["version"] == v1 and ref["resolved_uri"] == f"{dataset_uri}/{v1}"
    # the claim is reconciled: the run succeeded, so the next check starts nothing
    again = last_line(craft(env, "retrain-if-new-data", "--model", MODEL, "--profile", PROFILE, "--dataset",
                            dataset_uri, "--root", str(root), *stop))  # fmt: skip
    assert again.startswith("done:"), again
    assert run_dirs(root) == {run1}

    v3 = upload(env, corrupt_copy(tmp / "v1", tmp / "v3"), dataset_uri)
    out = craft(env, "retrain-if-new-data", "--model", MODEL, "--profile", PROFILE, "--dataset", dataset_uri,
                "--root", str(root), *stop, ok=None)  # fmt: skip
    assert last_line(out).startswith("invalid:") and v3 in last_line(out), out.stdout[-3000:] + out.stderr[-3000:]
    assert len(run_dirs(root)) == 2
    from craft.storage import datasets
    from craft.storage.objectstore import ObjectStore

    verdict = datasets.validation_of(ObjectStore.from_env(), env["CRAFT_REGISTRY"], "toy", v3)
    assert verdict["ok"] is False and verdict["n_failures"] >= 1  # recorded per dataset version
    again = last_line(craft(env, "retrain-if-new-data", "--model", MODEL, "--profile", PROFILE, "--dataset",
                            dataset_uri, "--root", str(root), *stop))  # fmt: skip
    assert again.startswith("invalid:") and len(run_dirs(root)) == 2
    assert models(env)["versions"] == []  # nothing registered along the way
