"""End to end on tiny pieces: demo data -> critic + probe -> `reward`, `ti`, `ti_lora`, `dpo` stage mains (slow)."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow


def test_stage_mains_end_to_end(tmp_path):
    from craft.config import load_stage_config
    from craft.models.diffusion import load_pipeline
    from craft.train import baselines, reward
    from tests.crafts_helpers import reward_world

    torch.set_num_threads(2)
    w = reward_world(tmp_path)
    data, ann = w["data"], w["ann"]
    small = ["loop.steps=1", "loop.batch_size=2", "loop.threads=2", "loop.progress=false"]
    m = reward.main(load_stage_config("reward", None, small + ["sample_steps=2"]), data, ann, tmp_path / "critic",
                    tmp_path / "probe", tmp_path / "base", tmp_path / "craft")  # fmt: skip
    assert {"reward", "reward_vdc", "reward_ccs", "reward_dd", "reward_sfs", "l_diff"} <= set(m)
    baselines.ti_main(load_stage_config("ti", None, small), data, tmp_path / "base", tmp_path / "ti")
    baselines.ti_lora_main(load_stage_config("ti_lora", None, small), data, tmp_path / "base", tmp_path / "tilora",
                           ti_dir=tmp_path / "ti")  # fmt: skip
    d = baselines.dpo_main(load_stage_config("dpo", None, small + ["n_pairs=2", "sample_steps=2"]), data, ann,
                           tmp_path / "critic", tmp_path / "probe", tmp_path / "base", tmp_path / "dpo",
                           start_dir=tmp_path / "tilora")  # fmt: skip
    assert "implicit_acc" in d
    # CRAFT continuing the TI+LoRA adapter (pipeline.craft_start=ti_lora): its tokens stay in prompts and output
    reward.main(load_stage_config("reward", None, small + ["sample_steps=2", "timestep_spacing=trailing"]), data,
                ann, tmp_path / "critic", tmp_path / "probe", tmp_path / "base", tmp_path / "craft-tl",
                start_dir=tmp_path / "tilora")  # fmt: skip
    tl_meta = json.loads((tmp_path / "craft-tl" / "adapter.json").read_text())
    assert tl_meta["class_tokens"] == json.loads((tmp_path / "tilora" / "adapter.json").read_text())["class_tokens"]
    assert tl_meta["lora"]["cross_attention_only"] and (tmp_path / "craft-tl" / reward.EMBEDS_FILE).is_file()
    # the same stage with an MLLM judge (an OpenAI-compatible server) choosing the preferred image of each pair
    from tests.annotate_server import ScriptedServer, chat_reply

    def first(n, req):  # shown both images of a pair at once, it always chooses the first one shown
        return chat_reply(json.dumps({"choice": "A", "reason": "image A shows the glands"}))

    with ScriptedServer(script=first) as srv:
        mcfg = load_stage_config("dpo", None, small + ["n_pairs=2", "sample_steps=2", "judge=mllm",
                                 "judge_backend.model=judge", f"judge_backend.base_url={srv.base_url}"])  # fmt: skip
        dm = baselines.dpo_main(mcfg, data, ann, tmp_path / "critic", tmp_path / "probe", tmp_path / "base",
                                tmp_path / "dpo-mllm", start_dir=tmp_path / "tilora")  # fmt: skip
        assert len(srv.seen) == 2 and all(len(r.images) == 2 for r in srv.seen)  # one request per pair
        assert "implicit_acc" in dm and "pair_margin_mean" not in dm and dm["judge_chose_first_share"] == 1.0
    assert json.loads((tmp_path / "dpo-mllm" / "adapter.json").read_text())["judge"] == "mllm"
    for name in ("craft", "craft-tl", "ti", "tilora", "dpo"):
        pipe = reward.load_adapters(load_pipeline(tmp_path / "base"), tmp_path / name)
        assert pipe is not None
        assert json.loads((tmp_path / name / "adapter.json").read_text())["metrics"]["steps"] == 1.0
