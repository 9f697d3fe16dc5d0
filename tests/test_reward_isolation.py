"""The reward stage reads only its critic (and the monitor's referee): never the evaluator, never the demo oracle
(CRAFT sec. 4.1.4; issue 21).

Selection or early stopping inside reward finetuning may use training-side signals only; the run below selects its
weights by the referee with early stopping on. This runs the real
stage main (`craft.train.reward.main`) in a fresh interpreter, with an evaluator encoder and a demo oracle cache
lying next to the critic, and checks what the process loaded: one encoder (the critic) and no module of
``craft.evaluate`` (where the evaluator's scoring and the oracle live).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
small = ["loop.steps=2", "loop.batch_size=2", "loop.threads=1", "loop.progress=false", "sample_steps=2",
         "augment.views=2",  # the augmented-view reward (issue 21) on the real stage path too
         # and the over-optimisation monitor choosing the saved weights by its referee (training-side signals only)
         "monitor.every=1", "monitor.prompts=4", "monitor.samples_per_prompt=1", "monitor.views=1",
         "monitor.select=referee", "monitor.patience=1",
         "ensemble=1"]  # and the reward averaged over the critic and one more independently trained critic
reward.main(load_stage_config("reward", None, small), t / "data", t / "ann", t / "critic", t / "probe", t / "base",
            t / "craft", referee_dir=t / "referee", referee_probe_dir=t / "referee_probe",
            ensemble=[(t / "critic-1", t / "critic-1_probe")])
print(json.dumps({"loaded": loaded, "evaluate_modules": sorted(m for m in sys.modules if m.startswith("craft.evaluate"))}))
"""


def test_reward_stage_loads_the_critic_and_nothing_of_evaluation(tmp_path):
    from tests.crafts_helpers import reward_world

    torch.set_num_threads(1)
    reward_world(tmp_path, evaluator=True, referee=True, ensemble=1)  # the evaluator lies beside the critic, unread

    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "CRAFT_LOCAL_MODEL_CACHE": str(tmp_path / "model-cache")}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["loaded"] == [str((tmp_path / r).resolve()) for r in ("critic", "critic-1", "referee")], seen
    assert seen["evaluate_modules"] == [], f"the reward stage imported evaluation code: {seen['evaluate_modules']}"
    assert not (tmp_path / "model-cache" / "oracle").exists(), "the reward stage trained or read a demo oracle"
    assert (tmp_path / "craft" / "adapter.json").is_file()
    info = json.loads((tmp_path / "craft" / "adapter.json").read_text())
    assert [Path(e).name for e, _ in info["ensemble"]] == ["critic-1"], info.get("ensemble")
