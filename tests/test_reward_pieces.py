"""The reward stage with its graph's decode in pieces (``reward.decode_chunk``), as ``craft train reward`` runs it:
the real critic (CAM: VDC, CCS, DD and SFS against each image's paired real image) scores pieces of the batch, and
the stage writes the adapter and metrics that decoding the whole batch at once writes (issue 18, memory)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file


def test_reward_stage_in_pieces_writes_the_whole_decodes_adapter(tmp_path, monkeypatch):
    from craft.config import load_stage_config
    from craft.models.encoders import ClinicalAlignmentModule
    from craft.train import reward
    from tests.crafts_helpers import reward_world

    torch.set_num_threads(2)
    w = reward_world(tmp_path)
    seen: list[int] = []
    call = ClinicalAlignmentModule.__call__

    def counting(self, images, *args, **kwargs):
        if torch.is_grad_enabled():  # the graph's reads (the monitor's held-out readings run without gradient)
            seen.append(images.shape[0])
        return call(self, images, *args, **kwargs)

    monkeypatch.setattr(ClinicalAlignmentModule, "__call__", counting)
    small = ["loop.steps=2", "loop.batch_size=2", "loop.threads=2", "loop.progress=false", "sample_steps=2"]
    out, metrics, calls = {}, {}, {}
    for chunk in (0, 1):
        seen.clear()
        cfg = load_stage_config("reward", None, [*small, f"decode_chunk={chunk}"])
        metrics[chunk] = reward.main(cfg, w["data"], w["ann"], tmp_path / "critic", tmp_path / "probe",
                                     tmp_path / "base", tmp_path / f"craft-{chunk}")  # fmt: skip
        out[chunk] = load_file(tmp_path / f"craft-{chunk}" / reward.LORA_FILE)
        calls[chunk] = list(seen)
        saved = json.loads((tmp_path / f"craft-{chunk}" / "adapter.json").read_text())
        assert saved["config"]["decode_chunk"] == chunk
    assert calls[0] == [4, 4] and calls[1] == [1] * 8, calls  # 2 prompts x 2 repeats a step, 2 steps
    for k in ("reward", "reward_vdc", "reward_ccs", "reward_dd", "reward_sfs", "l_diff"):
        assert abs(metrics[1][k] - metrics[0][k]) <= 1e-5 * max(1.0, abs(metrics[0][k])), (k, metrics)
    assert out[0].keys() == out[1].keys()
    assert any("lora_B" in k or "lora.up" in k for k in out[0]), sorted(out[0])[:4]
    assert all(float(v.abs().max()) > 0 for k, v in out[0].items() if "lora_B" in k or "lora.up" in k)  # trained
    for k in out[0]:  # the same seeded start (add_lora's seed), the same two steps
        diff = float((out[1][k] - out[0][k]).abs().max())
        assert torch.allclose(out[1][k], out[0][k], rtol=1e-4, atol=1e-7), (k, diff)
