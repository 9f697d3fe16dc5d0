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


def test_frozen_convs_and_silu_after_groupnorm_save_less_with_the_same_gradients_bit_for_bit():
    torch.manual_seed(0)
    model = Block()
    for m in (model.norm, model.conv, model.proj):
        m.requires_grad_(False)
    x = torch.randn(3, 4, 11, 10)
    plain_bytes, y0, g0 = grads(model, x, lean=False)
    lean_bytes, y1, g1 = grads(model, x, lean=True)
    assert torch.equal(y0, y1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))  # input gradient and the trainable head's, bit for bit
    # saved by default: GroupNorm's input + stats, SiLU's input, conv's, proj's and head's inputs; lean: no SiLU
    # input (GroupNorm's output) and no frozen conv input, head's input stays (its weight trains)
    act = 3 * 4 * 11 * 10 * 4
    assert plain_bytes - lean_bytes >= 2 * act
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
            assert "forward" in model.conv.__dict__ and n == 4  # norm, act, conv, head; not proj
            raise RuntimeError("inside")
    assert "forward" not in model.conv.__dict__ and model.conv.forward == own
    assert "forward" in model.proj.__dict__


def test_bf16_autocast_gradients_match_autograds_own():
    torch.manual_seed(0)
    model = Block()
    for m in (model.norm, model.conv, model.proj):
        m.requires_grad_(False)
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
