"""A local run writes only under its root: the demo's evaluate step, run by kfp.local with the task env the
compiled pipeline sets (``CRAFT_MODEL_CACHE=/cache/models``, the pod's emptyDir), as a user who cannot write ``/``.

The step trains and caches the demo oracle and the latents; before the fix they went to ``/cache/models``,
which a non-root user cannot create. As root the test drops to uid/gid 65534 in a subprocess.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534
POD_CACHE = "/cache/models"  # pipelines.resources.MODEL_CACHE["mount_path"]


def build_world(tmp: Path) -> dict[str, Path]:
    """Demo histo data (n=32, 32 px), offline annotations, critic + evaluator + probe, a tiny base and a LoRA."""
    import torch

    from craft.annotate.run import AnnotateConfig
    from craft.annotate.run import main as annotate
    from craft.data.demo import DemoConfig, generate
    from craft.models.diffusion import ModelConfig, build_components, save_pipeline
    from craft.train.probe import ProbeConfig, train_probe
    from craft.train.reward import LoraSettings, add_lora, save_adapters
    from tests.test_evaluate_run import _encoder as encoder  # the same tiny critic / evaluator as the wiring test

    torch.set_num_threads(1)

    ds = generate(DemoConfig(modality="histo", n=32, seed=0, resolution=32), tmp / "demo-histo")
    annotate(AnnotateConfig(backend="offline", checklist="demo-histo", progress=False), ds, tmp / "ann")
    evaluator = encoder("clip", 1, tmp / "evaluator")
    train_probe(ProbeConfig(epochs=5, lr=1e-2, threads=1), evaluator, ds, tmp / "probe")
    mc = ModelConfig(preset="tiny", resolution=32, unet_channels=[8, 16], vae_channels=[8, 8], text_hidden=16,
                     text_layers=1)  # fmt: skip
    comp = build_components(mc, ["adenocarcinoma", "adenoma"], seed=0)
    base = save_pipeline(comp.pipeline(), tmp / "base", {"test": True})
    add_lora(comp.unet, LoraSettings(rank=2, alpha=2.0))
    lora = save_adapters(tmp / "lora", unet=comp.unet, lora=LoraSettings(rank=2, alpha=2.0), info={"base": str(base)})
    return dict(ds=ds, ann=tmp / "ann", critic=encoder("siglip", 0, tmp / "critic"), evaluator=evaluator,
                probe=tmp / "probe", base=base, lora=lora)  # fmt: skip


def tiny_profile(tmp: Path) -> Path:
    """The evaluate section at test scale; the oracle's cache_dir left empty, so the step picks the model cache."""
    import yaml

    p = tmp / "tiny-demo.yaml"
    p.write_text(yaml.safe_dump({"evaluate": {
        "candidate": "craft", "max_prompts": 4, "samples_per_prompt": 2, "steps": 2, "guidance": 2.0, "batch_size": 8,
        "grid_per_class": 2, "threads": 1, "downstream": {"prompts": 4, "scales": [1.0], "epochs": 1},
        # thresholds no tiny oracle can fail, so it scores (tests/test_oracle_calibration.py checks refusals)
        "oracle": {"n": 64, "epochs": 1, "n_check": 16, "min_accuracy": None, "cache_dir": "",
                   "calibration": {"min_clean": 0.0, "min_nuisance": 0.0, "max_structure": 1.0}},
        "preferences": {"bootstrap": 20}}}))  # fmt: skip
    return p


def child_main(work: Path) -> None:
    """In the unprivileged process: build the inputs, then run evaluate_op as the demo does (kfp.local, the
    evaluate step's compiled settings, pipelines.local's session)."""
    from kfp import dsl

    from components.evaluate import evaluate_op
    from pipelines.local import local_session
    from pipelines.resources import apply_resources, settings_for

    assert os.geteuid() != 0 and not os.access("/", os.W_OK), "the step must run as a user who cannot write /"
    w = build_world(work / "inputs")
    profile = str(tiny_profile(work))

    def imp(path, cls):
        return dsl.importer(artifact_uri=str(path), artifact_class=cls, reimport=False).output

    @dsl.pipeline(name="demo-evaluate")
    def pipe():
        task = evaluate_op(dataset=imp(w["ds"], dsl.Dataset), annotations=imp(w["ann"], dsl.Dataset),
                           evaluator=imp(w["evaluator"], dsl.Model), evaluator_probe=imp(w["probe"], dsl.Model),
                           critic=imp(w["critic"], dsl.Model), base=imp(w["base"], dsl.Model),
                           craft=imp(w["lora"], dsl.Model), profile=profile, overrides=[],
                           dataset_version="test")  # fmt: skip
        settings = settings_for("evaluate")
        assert settings["model_cache"]["mount_path"] == POD_CACHE  # the pod's cache, in the task env below
        apply_resources(task, "evaluate", settings)

    with local_session(work / "runs"):
        pipe()


CAP_DAC_READ_SEARCH = 2  # linux/capability.h: read any file, search any folder; never write


def _demote():
    """In the forked child, before exec: become uid/gid 65534, keeping only CAP_DAC_READ_SEARCH (ambient, so it
    survives exec into the task processes too). The interpreter may live where 65534 cannot look (here under
    /root, mode 0700); reading is all the capability allows, so the process still cannot write ``/``."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    def check(rc, what):
        if rc != 0:
            raise OSError(ctypes.get_errno(), f"{what} failed")

    check(libc.prctl(8, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    data = (Data * 2)()
    bit = 1 << CAP_DAC_READ_SEARCH
    data[0].effective = data[0].permitted = data[0].inheritable = bit
    check(libc.capset(ctypes.byref(Header(0x20080522, 0)), data), "capset")  # _LINUX_CAPABILITY_VERSION_3
    check(libc.prctl(47, 2, CAP_DAC_READ_SEARCH, 0, 0), "prctl(PR_CAP_AMBIENT_RAISE)")


def test_local_evaluate_step_writes_only_under_its_root():
    root_user = os.geteuid() == 0
    if not root_user and os.access("/", os.W_OK):
        pytest.skip("this user can write / (not root, so no way to drop the right): nothing to show")
    pod_cache_existed = Path(POD_CACHE).exists()
    work = Path(tempfile.mkdtemp(prefix="craft-local-root-"))
    if root_user:
        os.chown(work, NOBODY, NOBODY)
    from components.images import TAG  # git refuses a repository another user owns: the tag comes from here

    env = {"CRAFT_IMAGE_TAG": TAG, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO), "HOME": "/nonexistent",
           "TMPDIR": str(work), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}  # fmt: skip
    code = (
        f"from pathlib import Path; from tests.test_demo_local_root import child_main; child_main(Path({str(work)!r}))"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=900, preexec_fn=_demote if root_user else None)  # fmt: skip
        tail = (proc.stdout + proc.stderr)[-4000:]
        assert proc.returncode == 0, (
            f"the evaluate step failed as uid {NOBODY if root_user else os.geteuid()}:\n{tail}"
        )
        found = list((work / "runs").rglob("metrics.json"))
        assert found, f"no metrics.json under the run root:\n{tail}"
        assert json.loads(found[0].read_text())["variants"]["craft"]["oracle_accuracy"] is not None
        # the oracle the step trained is cached under the run root, not in the pod's mount path or the home folder
        cache = work / "runs" / ".model-cache" / "oracle"
        assert cache.is_dir() and any(cache.iterdir()), f"no oracle cache at {cache}"
        if not pod_cache_existed:
            assert not Path(POD_CACHE).exists(), f"the local run created {POD_CACHE}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
