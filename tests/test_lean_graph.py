"""craft.models.lean_graph: autograd keeps only what backward reads, with the same gradients bit for bit."""

import pytest
import torch

from craft.models.lean_graph import lean_saves


def saved_bytes(fn):
    """Bytes of the non-parameter tensors autograd saves while ``fn`` runs (each storage once), and fn's result."""
    seen, total = set(), [0]

    def pack(x):
        key = x.untyped_storage().data_ptr()
        if key not in seen and not isinstance(x, torch.nn.Parameter):
            seen.add(key)
            total[0] += x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return total[0], out


class Block(torch.nn.Module):
    """A ResNet-block head (GroupNorm -> SiLU -> conv, strided and 1x1 convs), then a trainable layer."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.GroupNorm(2, 4)
        self.act = torch.nn.SiLU()
        self.conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)  # odd input size: output_padding matters
        self.proj = torch.nn.Conv2d(6, 6, 1)
        self.head = torch.nn.Conv2d(6, 2, 3, padding=1)  # trainable: keeps autograd's own path

    def forward(self, x):
        return self.head(self.proj(self.conv(self.act(self.norm(x)))))


def grads(model, x, lean: bool):
    x = x.detach().requires_grad_(True)
    with lean_saves(model) if lean else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        nbytes, y = saved_bytes(lambda: model(x))
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(y, [x, *params], g)
    return nbytes, y, got


def frozen_block() -> Block:
    """``Block`` as adapters meet it: everything frozen but the head."""
    torch.manual_seed(0)
    model = Block()
    for m in (model.norm, model.conv, model.proj):
        m.requires_grad_(False)
    return model


def test_frozen_convs_save_no_input_with_the_same_gradients_bit_for_bit():
    model = frozen_block()
    x = torch.randn(3, 4, 11, 10)
    plain_bytes, y0, g0 = grads(model, x, lean=False)
    lean_bytes, y1, g1 = grads(model, x, lean=True)
    assert torch.equal(y0, y1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))  # input gradient and the trainable head's, bit for bit
    # saved by default: GroupNorm's input + stats, SiLU's input, conv's, proj's and head's inputs; lean: not the
    # frozen conv's and proj's inputs (head's stays: its weight trains)
    frozen_inputs = (3 * 4 * 11 * 10 + 3 * 6 * 6 * 5) * 4
    assert plain_bytes - lean_bytes == frozen_inputs
    assert all("forward" not in m.__dict__ for m in model.modules())  # every module put back


def test_a_trainable_conv_keeps_autograds_path_and_its_weight_gradient():
    torch.manual_seed(0)
    model = Block()  # every layer trains
    x = torch.randn(2, 4, 9, 9)
    _, _, g0 = grads(model, x, lean=False)
    _, _, g1 = grads(model, x, lean=True)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_modules_are_put_back_after_an_error_and_an_already_replaced_forward_is_left_alone():
    model = Block().requires_grad_(False)
    own = model.conv.forward
    model.proj.forward = model.proj.forward  # an instance-level forward set by someone else (an offload hook, say)
    with pytest.raises(RuntimeError, match="inside"):
        with lean_saves(model) as n:
            assert "forward" in model.conv.__dict__ and n == 2  # conv and head; not proj
            raise RuntimeError("inside")
    assert "forward" not in model.conv.__dict__ and model.conv.forward == own
    assert "forward" in model.proj.__dict__


def test_bf16_autocast_gradients_match_autograds_own():
    model = frozen_block()
    x = torch.randn(2, 4, 9, 9)
    outs = []
    for lean in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(grads(model, x, lean))
    (_, y0, g0), (_, y1, g1) = outs
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        assert a.dtype == b.dtype
        assert torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0) > 0.999


def _objective(name: str):
    """A tiny baseline / ControlNet objective and one batch: only adapters (tokens, LoRA, ControlNet) train."""
    import copy

    from craft.models.diffusion import ModelConfig, build_components
    from craft.train.baselines import DPOObjective, LoRADiffusionObjective, TIObjective, add_class_tokens
    from craft.train.controlnet import ControlNetObjective, build_controlnet
    from craft.train.reward import LoraSettings, add_lora

    mc = ModelConfig(preset="tiny", resolution=32, unet_channels=[8, 16], vae_channels=[8, 8], text_hidden=16,
                     text_layers=1)  # fmt: skip
    comp = build_components(mc, ["adenocarcinoma", "adenoma"], seed=0)
    z0 = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    prompts = ["normal, pale glands", "adenocarcinoma, dark glands"] * 2
    if name == "ti":
        ids = add_class_tokens(comp.tokenizer, comp.text_encoder, {"<adenoma>": "adenoma"})
        model = TIObjective(comp.unet, comp.text_encoder, comp.tokenizer, comp.scheduler, ids)
        return model, {"latents": z0, "prompt": ["<adenoma> tissue"] * 4}
    if name == "controlnet":
        cn = build_controlnet(comp.unet, comp.vae)
        with torch.no_grad():  # zero convolutions off zero, so the UNet's path carries a gradient
            for n, p in cn.named_parameters():
                if "zero" in n or "controlnet_mid_block" in n or "controlnet_down_blocks" in n:
                    p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        model = ControlNetObjective(cn, comp.unet, comp.text_encoder, comp.tokenizer, comp.scheduler, 0.0)
        return model, {"latents": z0, "cond": torch.rand(4, 3, 32, 32), "prompt": prompts}
    add_lora(comp.unet, LoraSettings())
    with torch.no_grad():
        for n, p in comp.unet.named_parameters():
            if "lora_B" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    if name == "ti_lora":
        return LoRADiffusionObjective(comp.unet, comp.text_encoder, comp.tokenizer, comp.scheduler), {
            "latents": z0, "prompt": prompts}  # fmt: skip
    ref = copy.deepcopy(comp.unet)
    model = DPOObjective(comp.unet, ref, comp.text_encoder, comp.tokenizer, comp.scheduler, beta=50.0)
    return model, {"z_w": z0[:2], "z_l": z0[2:], "prompt": prompts[:2]}


# the share of saved bytes that goes at most: the ControlNet's own convolutions train and keep their inputs
@pytest.mark.parametrize("name,most", [("ti", 0.9), ("ti_lora", 0.9), ("dpo", 0.9), ("controlnet", 0.95)])
def test_baselines_and_controlnet_keep_less_through_the_frozen_unet_with_the_same_gradients(name, most, monkeypatch):
    import contextlib

    import craft.train.baselines as baselines
    import craft.train.controlnet as controlnet

    model, batch = _objective(name)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    runs = []
    for lean in (True, False):
        if not lean:  # autograd's own saving: the objectives' lean_saves made a no-op
            for mod in (baselines, controlnet):
                monkeypatch.setattr(mod, "lean_saves", lambda *m: contextlib.nullcontext())
        nbytes, out = saved_bytes(lambda: model(batch, torch.Generator().manual_seed(0)))
        runs.append((nbytes, out["loss"].detach(), torch.autograd.grad(out["loss"], params)))
    (lean_bytes, lean_loss, lean_g), (plain_bytes, plain_loss, plain_g) = runs
    assert torch.equal(lean_loss, plain_loss)
    assert any(g.abs().max() > 0 for g in plain_g)
    for a, b in zip(lean_g, plain_g):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-12), float((a - b).abs().max())
    assert lean_bytes < most * plain_bytes, (lean_bytes, plain_bytes)
