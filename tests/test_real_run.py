"""The first real run, as a user makes it (issue 16): real-layout checkpoints on the object store, one command.

A user with Stable Diffusion 2.1, MedSigLIP, SigLIP and MedGemma behind vLLM uploads the checkpoint folders as
they come from the hub, uploads a collection, and runs the chexpert plan (here its smoke profile, which is
the same DAG at one or two steps a stage):

    craft store upload ./stable-diffusion-2-1 s3://B/models/base/sd21
    craft store upload ./medsiglip-448 s3://B/models/encoders/medsiglip-448
    craft store upload ./siglip-so400m-patch14-384 s3://B/models/encoders/siglip
    craft store upload data/cxr s3://B/datasets/cxr
    craft demo --profile smoke-chexpert --dataset-uri s3://B/datasets/cxr --base-uri s3://B/models/base/sd21 \\
        pipeline.critic_uri=... pipeline.evaluator_uri=... annotate.base_url=... dpo.judge_backend.base_url=...

Real parts: the craft CLI in subprocesses, kfp.local running the whole compiled pipeline, SeaweedFS on loopback,
snapshots laid out exactly as the hub's (tests/sd21_layout.py: v-prediction scheduler, a VAE config declaring
768 beside a UNet implying 16 px, .ckpt/.bin decoys that crash if read; tests/real_layout.py: SigLIP with a
SentencePiece tokenizer). The one stand-in is the MLLM server (no vLLM/MedGemma can run here): a scripted
OpenAI-compatible server on loopback answering annotation and pairwise-judge requests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.annotate_server import ScriptedServer, chat_reply, valid_answer
from tests.real_layout import build_siglip_dir
from tests.sd21_layout import DECOYS, build_sd21_dir

REPO = Path(__file__).resolve().parents[1]
CRAFT = str(Path(sys.executable).parent / "craft")


def craft(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([CRAFT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=3000,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(f"craft {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-6000:]}\n"
                             f"{proc.stderr[-6000:]}")  # fmt: skip
    return proc


def image_count(body: dict) -> int:
    return sum(
        1
        for m in body.get("messages", [])
        if isinstance(m.get("content"), list)
        for c in m["content"]
        if c.get("type") == "image_url"
    )


def mllm(n, req):
    """Annotation requests (one image, a label in the instruction) get a valid schema answer; pairwise judge
    requests (two images) a choice."""
    if image_count(req.body) >= 2:
        return chat_reply(json.dumps({"choice": "A" if n % 2 else "B", "reason": "sharper costophrenic angles"}))
    return chat_reply(valid_answer(req.label))


@pytest.mark.timeout(2400)
def test_first_real_run_with_hub_layout_checkpoints(s3_env, tmp_path):
    bucket = s3_env.make_bucket("real")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KFP_")}
    env.update(s3_env.env, CRAFT_REGISTRY=f"s3://{bucket}", HF_HUB_OFFLINE="1", GX_ANALYTICS_ENABLED="False",
               MLLM_API_KEY="test-key", CRAFT_MODEL_CACHE=str(tmp_path / "model-cache"))  # fmt: skip
    sd21 = build_sd21_dir(tmp_path / "hub" / "stable-diffusion-2-1", "v_prediction")
    medsiglip = build_siglip_dir(tmp_path / "hub" / "medsiglip-448", seed=0)
    siglip = build_siglip_dir(tmp_path / "hub" / "siglip-so400m-patch14-384", seed=1)
    uris = {}
    for name, folder in (("sd21", sd21), ("medsiglip", medsiglip), ("siglip", siglip)):
        uris[name] = f"s3://{bucket}/models/{name}"
        craft(env, "store", "upload", str(folder), uris[name])
    data = tmp_path / "cxr"
    craft(env, "data", "demo", "--modality", "cxr", "--n", "48", "--seed", "0", "--resolution", "32",
          "--out", str(data))  # fmt: skip
    craft(env, "store", "upload", str(data), f"s3://{bucket}/datasets/cxr")

    with ScriptedServer(script=mllm) as srv:
        out = craft(env, "demo", "--profile", "smoke-chexpert", "--root", str(tmp_path / "runs"),
                    "--dataset-uri", f"s3://{bucket}/datasets/cxr", "--base-uri", uris["sd21"],
                    f"pipeline.critic_uri={uris['medsiglip']}", f"pipeline.evaluator_uri={uris['siglip']}",
                    f"annotate.base_url={srv.base_url}", f"dpo.judge_backend.base_url={srv.base_url}")  # fmt: skip
        seen = list(srv.seen)
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("smoke-chexpert: registered version "), out.stdout[-4000:]

    # the MLLM annotated every image (schema-constrained) and judged DPO's pairs two images at a time
    annotations = [s for s in seen if image_count(s.body) == 1]
    judged = [s for s in seen if image_count(s.body) == 2]
    assert len({s.image for s in annotations}) == 48 and len(judged) >= 2
    assert all(s.body.get("response_format", {}).get("type") == "json_schema" for s in annotations)

    # every variant of the plan was scored by the SigLIP evaluator, never by the MedSigLIP critic
    runs = tmp_path / "runs"
    metrics = json.loads(next(p for p in runs.rglob("metrics.json") if "evaluate" in str(p)).read_text())
    assert {"zero_shot", "ti", "ti_lora", "dpo", "craft", "real"} <= set(metrics["variants"])
    reg = json.loads(craft(env, "models", "smoke-chexpert").stdout)
    lineage = reg["versions"][0]
    assert reg["aliases"]["candidate"]["version"] == lineage["version"] and reg["production"] is None

    # the snapshots loaded as hub snapshots: v-prediction kept, UNet-implied size, decoys never downloaded
    cached = [p for p in (tmp_path / "model-cache").rglob("*") if p.is_file()]
    assert cached and not [p for p in cached if p.name in {Path(d).name for d in DECOYS if "." in d}
                           and not p.name.endswith(".safetensors")]  # fmt: skip
