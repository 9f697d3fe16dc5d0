"""The reward stage reads only its critic: never the evaluator, never the demo oracle (CRAFT sec. 4.1.4; issue 21).

Selection or early stopping inside reward finetuning may use training-side signals only. This runs the real
stage main (`craft.train.reward.main`) in a fresh interpreter, with an evaluator encoder and a demo oracle cache
lying next to the critic, and checks what the process loaded: one encoder (the critic) and no module of
``craft.evaluate`` (where the evaluator's scoring and the oracle live).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys
from pathlib import Path
import craft.models.encoders as enc
loaded = []
real = enc.load_encoder
def audited(path, *a, **k):
    loaded.append(str(Path(path).resolve()))
    return real(path, *a, **k)
enc.load_encoder = audited
from craft.config import load_stage_config
from craft.train import reward
t = Path(sys.argv[1])
small = ["loop.steps=1", "loop.batch_size=2", "loop.threads=1", "loop.progress=false", "sample_steps=2",
         "augment.views=2"]  # the augmented-view reward (issue 21) on the real stage path too
reward.main(load_stage_config("reward", None, small), t / "data", t / "ann", t / "critic", t / "probe", t / "base",
            t / "craft")
print(json.dumps({"loaded": loaded, "evaluate_modules": sorted(m for m in sys.modules if m.startswith("craft.evaluate"))}))
"""


def test_reward_stage_loads_the_critic_and_nothing_of_evaluation(tmp_path):
    from craft.config import load_stage_config
    from craft.data.demo import DemoConfig, generate
    from craft.data.manifest import read_manifest
    from craft.models.diffusion import ModelConfig, build_components, save_pipeline
    from craft.train import encoder, probe, reward

    torch.set_num_threads(1)
    data = tmp_path / "data"
    generate(DemoConfig(modality="histo", n=16, seed=0, resolution=32, images_per_patient=2), data)
    df = read_manifest(data)
    ann = tmp_path / "ann"
    ann.mkdir()
    pd.DataFrame({"image_id": df["image_id"], "enriched_prompt": [f"{lab} tissue with glands" for lab in df["label"]],
                  "status": "ok"}).to_parquet(ann / "annotations.parquet")  # fmt: skip
    shutil.copy(
        Path(reward.__file__).parents[1] / "annotate" / "checklists" / "demo-histo.json", ann / "checklists.json"
    )
    ecfg = load_stage_config("encoder", None, ["epochs=1", "batch_size=8"])
    encoder.main(ecfg, "critic", data, tmp_path / "critic", ann)
    encoder.main(ecfg, "evaluator", data, tmp_path / "evaluator", ann)  # lies beside the critic, must stay unread
    probe.main(load_stage_config("probe", None, ["epochs=2"]), tmp_path / "critic", data, tmp_path / "probe")
    mc = ModelConfig(preset="tiny", resolution=32, unet_channels=[8, 16], vae_channels=[8, 8], text_hidden=16,
                     text_layers=1)  # fmt: skip
    comp = build_components(mc, ["adenocarcinoma", "adenoma", "normal", "mucinous carcinoma"])
    save_pipeline(comp.pipeline(), tmp_path / "base", {"stage": "test"})

    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "CRAFT_LOCAL_MODEL_CACHE": str(tmp_path / "model-cache")}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["loaded"] == [str((tmp_path / "critic").resolve())], seen
    assert seen["evaluate_modules"] == [], f"the reward stage imported evaluation code: {seen['evaluate_modules']}"
    assert not (tmp_path / "model-cache" / "oracle").exists(), "the reward stage trained or read a demo oracle"
    assert (tmp_path / "craft" / "adapter.json").is_file()
