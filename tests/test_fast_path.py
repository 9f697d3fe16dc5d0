"""The fast DRaFT / CRAFTS / baseline steps keep the math: their LoRA gradients equal the reference path's (issue 18).

Reference = every speed switch off, as the step ran before: text re-encoded each step, the no-graph prefix under
no_grad, L_diff as its own UNet call, the graph step and the decode checkpointed. Fast = the defaults.
"""

from __future__ import annotations

import pytest
import torch

from craft.models.accel import autocast
from craft.models.diffusion import ModelConfig, build_components
from craft.train.reward import DraftObjective, LoraSettings, RewardConfig, add_lora

torch.set_num_threads(2)
PROMPTS = ["normal colon mucosa", "adenocarcinoma with crowded glands", "adenoma"]


def tiny(lora: LoraSettings | None = None, vae_channels: tuple[int, int] = (8, 8)):
    mc = ModelConfig(preset="tiny", resolution=32, unet_channels=[8, 16], vae_channels=list(vae_channels),
                     text_hidden=16, text_layers=1)  # fmt: skip
    comp = build_components(mc, ["adenocarcinoma", "adenoma"], seed=0)
    add_lora(comp.unet, lora or LoraSettings())
    torch.manual_seed(3)
    with torch.no_grad():  # move the LoRA off its zero init so lora_A gets a gradient too
        for n, p in comp.unet.named_parameters():
            if "lora" in n:
                p.add_(0.05 * torch.randn_like(p))
    return comp


def reward(images, meta):
    return {"total": -((images - 0.4) ** 2).mean(dim=(1, 2, 3))}


FAST = {}
REFERENCE = dict(text_cache=0, prefix_inference_mode=False, fuse_diffusion_loss=False, channels_last="off",
                 compile_prefix="off", merge_prefix_lora=False, trace_prefix="off", lean_saves=False)  # fmt: skip


def cfg(**kw) -> RewardConfig:
    c = RewardConfig(**{**dict(k=2, n_repeats=2, sample_steps=4, guidance=3.0, diffusion_weight=1.0), **kw})
    c.validate()
    return c


def rowwise_reward(images, meta):
    return {"total": -((images - 0.4) ** 2).mean(dim=(1, 2, 3)), "mean": images.mean(dim=(1, 2, 3)).detach()}


rowwise_reward.rowwise = True


def draft(comp, c: RewardConfig, fn=rowwise_reward) -> DraftObjective:
    model = DraftObjective(comp.unet, comp.vae, comp.text_encoder, comp.tokenizer, comp.scheduler, fn, c)
    return model.train()


def lora_grad_of_step(comp, model, precision: str = "no"):
    """One step of ``model`` on the three prompts (fixed noise and paired latents): its LoRA gradient and result."""
    batch = {"prompt": PROMPTS, "label": ["a", "b", "c"],
             "latents": torch.randn(len(PROMPTS), 4, 16, 16, generator=torch.Generator().manual_seed(1))}  # fmt: skip
    comp.unet.zero_grad(set_to_none=True)
    with autocast("cpu", precision):
        res = model(batch, torch.Generator().manual_seed(0))
    res["loss"].backward()
    return torch.cat([p.grad.flatten() for n, p in comp.unet.named_parameters() if "lora" in n]), res


def step_grads(comp, c: RewardConfig, checkpointing: bool, precision: str = "no", steps: int = 2):
    """LoRA gradient of the ``steps``-th step (the text cache is warm from step 1 on) and that step's loss."""
    model = draft(comp, c, reward)
    if checkpointing:
        model.enable_gradient_checkpointing()
    for _ in range(steps):
        grad, res = lora_grad_of_step(comp, model, precision)
    return grad, res, model


def test_fast_path_lora_gradient_equals_reference_fp32():
    comp = tiny()
    ref, r_ref, _ = step_grads(comp, cfg(**REFERENCE), checkpointing=True)
    fast, r_fast, model = step_grads(comp, cfg(**FAST), checkpointing=False)
    assert not model.checkpointing and model._text, "the fast path did not run as configured"
    assert ref.abs().max() > 0
    assert torch.allclose(r_fast["loss"], r_ref["loss"], rtol=1e-5, atol=1e-6)
    assert torch.allclose(r_fast["l_diff"], r_ref["l_diff"], rtol=1e-5, atol=1e-6)
    assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-7), float((fast - ref).abs().max())


SWITCHES = [
    "text_cache",
    "prefix_inference_mode",
    "fuse_diffusion_loss",
    "merge_prefix_lora",
    "trace_prefix",
    "lean_saves",
]


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_alone_keeps_the_gradient(switch):
    comp = tiny()
    ref, _, _ = step_grads(comp, cfg(**REFERENCE), checkpointing=False, steps=1)
    one = dict(REFERENCE)
    one.pop(switch)  # that switch at its (fast) default, the others at the reference
    got, _, _ = step_grads(comp, cfg(**one), checkpointing=False, steps=2)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-7), (switch, float((got - ref).abs().max()))


def test_traced_prefix_follows_every_lora_update_and_matches_the_eager_prefix():
    comp = tiny()
    c_fast, c_eager = cfg(), cfg(trace_prefix="off")
    fast = DraftObjective(comp.unet, comp.vae, comp.text_encoder, comp.tokenizer, comp.scheduler, reward, c_fast)
    eager = DraftObjective(comp.unet, comp.vae, comp.text_encoder, comp.tokenizer, comp.scheduler, reward, c_eager)
    fast.train(), eager.train()
    batch = {"prompt": PROMPTS, "label": ["a", "b", "c"]}
    lora = [p for n, p in comp.unet.named_parameters() if "lora" in n]
    for step in range(3):
        with torch.no_grad():
            got = fast(batch, torch.Generator().manual_seed(step))["reward"]
            want = eager(batch, torch.Generator().manual_seed(step))["reward"]
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (step, float(got), float(want))
            for p in lora:  # what an optimizer step does: the trace must compute with the new weights
                p.add_(0.2 * torch.randn_like(p))
    assert len(fast._traces) == 1 and not eager._traces  # traced once for the prefix's shapes, reused after
    assert not any("_traces" in k for k in fast.state_dict())


def test_the_prefix_trace_runs_without_torchscripts_optimising_passes(monkeypatch):
    """The trace's optimised plan is no faster here and keeps more graph copies alive (craft.train.reward.run_trace):
    every traced call, the check against the eager call included, runs with the thread's optimise switch off, and the
    switch is back on after."""
    import craft.train.reward as R

    seen = []
    inner = torch.jit.optimized_execution

    def spy(flag):
        seen.append(flag)
        return inner(flag)

    monkeypatch.setattr(torch.jit, "optimized_execution", spy)
    monkeypatch.setattr(R, "_SHARED_TRACES", {})
    comp = tiny()
    fast = DraftObjective(comp.unet, comp.vae, comp.text_encoder, comp.tokenizer, comp.scheduler, reward, cfg())
    fast.train()
    with torch.no_grad():
        fast({"prompt": PROMPTS, "label": ["a", "b", "c"]}, torch.Generator().manual_seed(0))
    assert len(fast._traces) == 1 and seen and set(seen) == {False}
    assert len(seen) >= cfg().sample_steps - cfg().k  # every prefix step, not only the first
    assert torch._C._get_graph_executor_optimize()


def test_reward_runs_in_one_process_share_one_trace_rebound_to_each_unets_weights(monkeypatch):
    """TorchScript never frees a trace's types and graph (~23 MB for the demo UNet), so every reward run in one process
    (``craft experiment`` runs dozens) must reuse the first trace of its architecture, computing with its own weights,
    and a trace must not keep a finished run's weights alive."""
    import gc
    import weakref

    import craft.train.reward as R

    monkeypatch.setattr(R, "_SHARED_TRACES", {})
    made = []
    real_trace = torch.jit.trace
    monkeypatch.setattr(torch.jit, "trace", lambda *a, **k: made.append(1) or real_trace(*a, **k))
    comps = [tiny(), tiny()]
    with torch.no_grad():  # the second run's LoRA differs: a trace stuck on the first run's weights would show
        for n, p in comps[1].unet.named_parameters():
            if "lora" in n:
                p.add_(0.3 * torch.randn_like(p))
    batch = {"prompt": PROMPTS, "label": ["a", "b", "c"]}

    def objective(comp, c):
        return DraftObjective(
            comp.unet, comp.vae, comp.text_encoder, comp.tokenizer, comp.scheduler, reward, c
        ).train()

    fast = [objective(c, cfg()) for c in comps]
    eager = [objective(c, cfg(trace_prefix="off")) for c in comps]
    got = {}
    with torch.no_grad():
        for i in (0, 1, 0, 1):  # alternating: each call rebinds the shared trace to its own UNet
            r = fast[i](batch, torch.Generator().manual_seed(7))["reward"]
            want = eager[i](batch, torch.Generator().manual_seed(7))["reward"]
            assert torch.allclose(r, want, rtol=1e-5, atol=1e-6), (i, float(r), float(want))
            got[i] = float(r)
    assert abs(got[0] - got[1]) > 1e-4  # the two runs' rewards differ, so rebinding was tested
    assert len(made) == 1 and len(R._SHARED_TRACES) == 1  # traced once, for both runs
    assert list(fast[0]._traces.values()) == list(fast[1]._traces.values())

    # a finished run's weights are not kept alive by the trace it was last bound to
    last = weakref.ref(next(p for n, p in comps[1].unet.named_parameters() if "lora_A" in n))
    del fast[1], eager[1], comps[1]
    gc.collect()
    assert last() is None

    # another thread gets its own trace: a trace rebound under a running call would compute with the wrong weights
    import threading

    worker = threading.Thread(target=lambda: torch.no_grad()(fast[0])(batch, torch.Generator().manual_seed(7)))
    worker.start()
    worker.join()
    assert len(made) == 2 and len(R._SHARED_TRACES) == 2

    # another architecture (LoRA rank 8: other shapes) gets its own trace
    other = tiny(LoraSettings(rank=8))
    with torch.no_grad():
        objective(other, cfg())(batch, torch.Generator().manual_seed(7))
    assert len(made) == 3 and len(R._SHARED_TRACES) == 3


def test_a_train_mode_unet_with_dropout_traces_and_its_trace_draws_the_same_masks():
    from craft.train.reward import trace_unet_call

    comp = tiny()
    drops = [m for m in comp.unet.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops
    for m in drops:
        m.p = 0.3
    comp.unet.train()
    x, t, s = torch.randn(4, 4, 16, 16), torch.tensor(7), torch.randn(4, 8, comp.unet.config.cross_attention_dim)
    traced = trace_unet_call(comp.unet, x, t, s)  # checked against the eager call under one seed: no refusal
    # one flat graph over the UNet's own tensors: no TorchScript module per UNet submodule (which would stay in memory
    # for the life of the process), and no copies of the weights
    assert not list(traced.children())
    own = {v.data_ptr() for v in comp.unet.state_dict(keep_vars=True).values()}
    assert {b.data_ptr() for b in traced.buffers()} <= own
    with torch.no_grad():
        torch.manual_seed(5)
        a = traced(x, t, s)
        torch.manual_seed(5)
        b = comp.unet(x, t, encoder_hidden_states=s).sample
        c = traced(x, t, s)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6) and not torch.allclose(a, c)  # dropout is live, same masks
    with torch.no_grad():  # a base weight changed in place (not a LoRA weight): the trace reads the slot, no copy
        comp.unet.conv_in.weight.mul_(1.5)
        torch.manual_seed(5)
        a = traced(x, t, s)
        torch.manual_seed(5)
        b = comp.unet(x, t, encoder_hidden_states=s).sample
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_merged_prefix_folds_the_lora_and_puts_the_base_weights_back_bit_for_bit():
    from peft.tuners.lora import LoraLayer

    from craft.models.adapters import merged_lora

    comp = tiny()
    layers = [m for m in comp.unet.modules() if isinstance(m, LoraLayer)]
    before = {id(m): (m.get_base_layer().weight.data_ptr(), m.get_base_layer().weight.clone()) for m in layers}
    x, t, s = torch.randn(2, 4, 16, 16), torch.tensor(7), torch.randn(2, 8, comp.unet.config.cross_attention_dim)
    with torch.no_grad():
        plain = comp.unet(x, t, encoder_hidden_states=s).sample
        with merged_lora(comp.unet):
            assert all(m.merged for m in layers)  # peft's forward takes the one-matmul branch
            w = layers[0].get_base_layer().weight
            assert not torch.equal(w, before[id(layers[0])][1])  # the delta is in the weight the forward reads
            folded = comp.unet(x, t, encoder_hidden_states=s).sample
    assert torch.allclose(folded, plain, rtol=1e-4, atol=1e-5), float((folded - plain).abs().max())
    with pytest.raises(RuntimeError, match="inside"), merged_lora(comp.unet):
        raise RuntimeError("a failure inside the prefix")
    for m in layers:  # the same storage, the same bits; peft's state back to unmerged
        ptr, copy = before[id(m)]
        w = m.get_base_layer().weight
        assert w.data_ptr() == ptr and torch.equal(w, copy) and not m.merged


@pytest.mark.slow  # inductor compiles the tiny UNet (C++ on the CPU): 20-150 s depending on load and its cache
def test_compiled_prefix_keeps_the_gradient_and_the_state_dict():
    comp = tiny()
    ref, r_ref, _ = step_grads(comp, cfg(**REFERENCE), checkpointing=True)
    got, r_got, model = step_grads(comp, cfg(compile_prefix="on"), checkpointing=False)
    assert model.prefix_unet is not model.unet  # the compiled wrapper ran the prefix
    assert torch.allclose(r_got["loss"], r_ref["loss"], rtol=1e-4, atol=1e-6)
    assert torch.allclose(got, ref, rtol=1e-3, atol=1e-6), float((got - ref).abs().max())
    assert not any(k.startswith("prefix_unet") for k in model.state_dict())  # shared weights, saved once


@pytest.mark.skipif(not torch.amp.autocast_mode.is_autocast_available("cpu"), reason="no CPU autocast in this torch")
def test_fast_path_bf16_gradient_direction_matches_fp32_reference():
    comp = tiny()
    ref, _, _ = step_grads(comp, cfg(**REFERENCE), checkpointing=True)
    fast, res, _ = step_grads(comp, cfg(**FAST), checkpointing=False, precision="bf16")
    assert torch.isfinite(fast).all() and torch.isfinite(res["loss"])
    assert not torch.equal(fast, ref), "bf16 autocast changed nothing"
    cos = torch.nn.functional.cosine_similarity(fast, ref, dim=0)
    assert cos >= 0.99, float(cos)


def test_memory_budget_switches_checkpointing_on_only_when_the_graph_exceeds_it():
    comp = tiny()
    _, _, small = step_grads(comp, cfg(memory_budget_gb=1e-6), checkpointing=False, steps=1)
    assert small.checkpointing and small.graph_gb_estimate > 1e-6
    _, _, large = step_grads(comp, cfg(memory_budget_gb=64.0), checkpointing=False, steps=1)
    assert not large.checkpointing and large.graph_gb_estimate == pytest.approx(small.graph_gb_estimate, rel=1e-6)
    _, _, none = step_grads(comp, cfg(), checkpointing=False, steps=1)
    assert not none.checkpointing and none.graph_gb_estimate is None  # no budget: no probe
    with pytest.raises(ValueError, match="memory_budget_gb"):
        cfg(memory_budget_gb=-2.0)


def test_the_auto_memory_budget_is_most_of_the_free_cuda_memory_and_none_on_a_cpu(monkeypatch):
    """memory_budget_gb=-1 (the default): 80% of what the CUDA device has free at the first step (the driver's free
    memory and what PyTorch's allocator holds unused); no budget, so no probe, on a CPU. CUDA is faked here (this
    machine has none): the memory queries are replaced, the arithmetic is the function's; tests/test_gpu.py runs it."""
    from craft.train.reward import graph_budget_gb, has_graph_budget

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert graph_budget_gb(-1, cpu) == 0.0 and graph_budget_gb(0, cuda) == 0.0 and graph_budget_gb(12.5, cpu) == 12.5
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * 2**30)
    assert graph_budget_gb(-1, cuda) == pytest.approx(0.8 * 25)
    assert has_graph_budget(-1, cuda) and not has_graph_budget(-1, cpu) and not has_graph_budget(0, cuda)
    _, _, auto = step_grads(tiny(), cfg(), checkpointing=False, steps=1)  # the default, on this CPU
    assert auto.graph_gb_estimate is None and auto.memory_budget_gb is None and not auto.checkpointing


def test_text_cache_encodes_each_prompt_once_across_steps():
    comp = tiny()
    calls = []
    h = comp.text_encoder.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        step_grads(comp, cfg(), checkpointing=False, steps=3)
    finally:
        h.remove()
    assert sum(calls) == len(PROMPTS) + 1, calls  # the three prompts once, plus the empty prompt once
    calls.clear()
    h = comp.text_encoder.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        step_grads(comp, cfg(text_cache=0), checkpointing=False, steps=3)
    finally:
        h.remove()
    assert sum(calls) == 3 * len(PROMPTS) + 1, calls


def test_fused_adamw_takes_the_same_steps_as_the_per_tensor_loop(tmp_path):
    """loop.fused_optimizer (the default) updates the weights as the per-tensor AdamW does, warm-up and decay included."""
    from craft.train.loop import LoopConfig, train

    def run(fused: bool):
        comp = tiny()
        model = DraftObjective(comp.unet, comp.vae, comp.text_encoder, comp.tokenizer, comp.scheduler, reward,
                               cfg(k=1, sample_steps=2, n_repeats=1))  # fmt: skip
        data = {"prompt": PROMPTS, "label": ["a", "b", "c"], "latents": torch.randn(3, 4, 16, 16)}
        loop = LoopConfig(steps=3, batch_size=2, lr=1e-2, weight_decay=0.01, warmup_steps=1, threads=2,
                          progress=False, fused_optimizer=fused)  # fmt: skip
        train(model, data, loop, tmp_path / f"fused-{fused}")
        return torch.cat([p.detach().flatten() for n, p in comp.unet.named_parameters() if "lora" in n])

    plain, fused = run(False), run(True)
    assert not torch.equal(plain, torch.cat([p.detach().flatten() for n, p in tiny().unet.named_parameters()
                                             if "lora" in n]))  # fmt: skip
    # not bit-identical: the fused kernel rounds in another order (measured max |diff| 6.7e-7 on weights ~0.3)
    assert torch.allclose(fused, plain, rtol=1e-5, atol=2e-6), float((fused - plain).abs().max())


def test_lean_saves_keeps_less_for_backward_and_the_same_lora_gradient():
    """craft.models.lean_graph in the DRaFT step: frozen convolutions (every conv of the UNet and the VAE decoder)
    save no input; the budget probe sees the smaller graph, the gradient is the same (bit for bit at K=1; at K=2
    autograd sums a few multi-path gradients in another order: ~1e-11 relative)."""
    comp = tiny()
    plain, r_plain, m_plain = step_grads(comp, cfg(lean_saves=False, memory_budget_gb=100.0), False, steps=1)
    lean, r_lean, m_lean = step_grads(comp, cfg(memory_budget_gb=100.0), False, steps=1)
    assert not m_lean.checkpointing and plain.abs().max() > 0
    assert torch.equal(r_lean["loss"], r_plain["loss"])
    assert torch.allclose(lean, plain, rtol=1e-7, atol=1e-12), float((lean - plain).abs().max())
    assert m_lean.graph_gb_estimate < 0.85 * m_plain.graph_gb_estimate, (m_lean.graph_gb_estimate,
                                                                        m_plain.graph_gb_estimate)  # fmt: skip
    assert all("forward" not in m.__dict__ for m in [*comp.unet.modules(), *comp.vae.modules()])
    one, _, _ = step_grads(comp, cfg(k=1, lean_saves=False), False, steps=1)
    assert torch.equal(step_grads(comp, cfg(k=1), False, steps=1)[0], one)


class SavedBytes:
    """Bytes autograd holds for backward at its peak: a saved-tensor hook counts a storage in when a tensor on it is
    first saved and out when autograd has released the last saved tensor on it (weakref finalizers)."""

    def __init__(self):
        self.live = self.peak = 0
        self._views: dict[int, int] = {}  # storage -> saved tensors on it still alive

    def pack(self, x: torch.Tensor):
        import weakref

        if not isinstance(x, torch.nn.Parameter):
            key, n = x.untyped_storage().data_ptr(), x.untyped_storage().nbytes()
            if key not in self._views:
                self._views[key] = 0
                self.live += n
                self.peak = max(self.peak, self.live)
            self._views[key] += 1
            weakref.finalize(x, self._release, key, n)
        return x

    def _release(self, key: int, n: int) -> None:
        self._views[key] -= 1
        if not self._views[key]:
            del self._views[key]
            self.live -= n


def test_decoding_in_pieces_keeps_the_rewards_and_the_lora_gradient():
    """RewardConfig.decode_chunk: the graph's decode and reward in pieces (3 prompts x 2 repeats = 6 images in pieces
    of 1, 2 and 4 + 2) give the whole batch's rewards and LoRA gradient, L_diff fused or not."""
    comp = tiny()
    whole, r_whole = lora_grad_of_step(comp, draft(comp, cfg(decode_chunk=0)))
    assert whole.abs().max() > 0
    sizes = []
    hook = comp.vae.decoder.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    try:
        for chunk, fuse in ((1, True), (2, True), (4, True), (4, False)):
            sizes.clear()
            got, res = lora_grad_of_step(comp, draft(comp, cfg(decode_chunk=chunk, fuse_diffusion_loss=fuse)))
            assert sizes == [chunk] * (6 // chunk) + ([6 % chunk] if 6 % chunk else []), (chunk, sizes)
            for k in ("loss", "reward", "reward_mean", "l_diff"):
                assert torch.allclose(res[k], r_whole[k], rtol=1e-5, atol=1e-7), (chunk, k, res[k], r_whole[k])
            assert torch.allclose(got, whole, rtol=1e-4, atol=1e-8), (chunk, float((got - whole).abs().max()))
    finally:
        hook.remove()


def test_decoding_in_pieces_holds_less_for_backward():
    """Peak bytes autograd holds during a step (forward and every backward), whole decode vs pieces of one image:
    the pieces save (nearly all of) five of the six images' decoder share the budget probe measures (6 images, K=1)."""
    from torch.autograd.graph import saved_tensors_hooks

    comp = tiny(vae_channels=(32, 32))  # a decoder whose share of the graph is large enough to see
    peaks = {}
    for chunk in (0, 1):
        model = draft(comp, cfg(k=1, decode_chunk=chunk, diffusion_weight=0.0, memory_budget_gb=64.0))
        count = SavedBytes()
        lora_grad_of_step(comp, model)  # the probe, the trace and the text cache first: not the step's graph
        with saved_tensors_hooks(count.pack, lambda x: x):
            lora_grad_of_step(comp, model)
        assert count.live == 0, "a saved tensor outlived the step"
        peaks[chunk] = count.peak
    decode_bytes = model.graph_gb_parts[1] * 2**30
    assert peaks[0] - peaks[1] >= 0.8 * decode_bytes * 5 / 6, (peaks, decode_bytes)  # measured: 1.0x


def test_a_reward_not_marked_rowwise_sees_the_whole_batch():
    comp = tiny()
    seen = []

    def batch_reward(images, meta):  # e.g. a reward comparing the images of a batch: it must see them together
        seen.append(images.shape[0])
        return {"total": -((images - images.mean(0)) ** 2).mean(dim=(1, 2, 3))}

    lora_grad_of_step(comp, draft(comp, cfg(decode_chunk=1), batch_reward))
    assert seen == [6], seen
    with pytest.raises(ValueError, match="decode_chunk"):
        cfg(decode_chunk=-2)


def test_memory_budget_decodes_in_pieces_before_it_checkpoints():
    """With a rowwise reward and decode_chunk at auto, a budget the UNet calls fit but the whole decode does not gets
    the largest piece that fits and no checkpointing; a budget under the UNet calls' share checkpoints."""
    comp = tiny()
    probe = draft(comp, cfg(memory_budget_gb=64.0))
    lora_grad_of_step(comp, probe)
    unet_gb, decode_gb = probe.graph_gb_parts
    assert unet_gb > 0 and decode_gb > 0 and probe.decode_pieces is None and not probe.checkpointing
    per_image = decode_gb / 6
    model = draft(comp, cfg(memory_budget_gb=unet_gb + 2.5 * per_image))
    sizes = []
    hook = comp.vae.decoder.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    try:
        lora_grad_of_step(comp, model)
    finally:
        hook.remove()
    assert model.decode_pieces == 2 and not model.checkpointing, (model.decode_pieces, model.checkpointing)
    assert sizes[-3:] == [2, 2, 2], sizes  # the probe's one image, then the step's pieces
    tight = draft(comp, cfg(memory_budget_gb=0.5 * unet_gb))
    lora_grad_of_step(comp, tight)
    assert tight.checkpointing and tight.decode_pieces is None
    fixed = draft(comp, cfg(memory_budget_gb=unet_gb + 2.5 * per_image, decode_chunk=0))
    lora_grad_of_step(comp, fixed)  # a fixed decode_chunk is the user's: the budget only checkpoints
    assert fixed.checkpointing and fixed.decode_pieces is None
    fits = draft(comp, cfg(memory_budget_gb=unet_gb + 2.5 * per_image, decode_chunk=2))
    lora_grad_of_step(comp, fits)  # ... and counts the pieces it asked for
    assert not fits.checkpointing and fits.decode_pieces is None


def test_add_lora_draws_its_init_from_the_seed_and_leaves_the_global_rng_alone():
    """A stage's fresh LoRA is a function of loop.seed, not of what used the global RNG before it in the process."""

    def init(seed, burn: int):
        comp = build_components(ModelConfig(preset="tiny", resolution=32, unet_channels=[8, 16], vae_channels=[8, 8],
                                            text_hidden=16, text_layers=1), ["adenoma"], seed=0)  # fmt: skip
        torch.manual_seed(burn)  # another history of the global RNG before the stage
        state = torch.get_rng_state()
        add_lora(comp.unet, LoraSettings(), seed=seed)
        assert seed is None or torch.equal(torch.get_rng_state(), state), "add_lora moved the global RNG"
        return torch.cat([p.detach().flatten() for n, p in comp.unet.named_parameters() if "lora_A" in n])

    assert torch.equal(init(7, burn=1), init(7, burn=2))
    assert not torch.equal(init(7, burn=1), init(8, burn=1))
    assert not torch.equal(init(None, burn=1), init(None, burn=2))  # unseeded: the global RNG's history decides
