"""The fast step (fused attention in the backbone and in the mean-shift modes) trains exactly as
an explicit eager step does: same loss terms and gradients in fp32 on CPU, within rounding."""

from __future__ import annotations

import pytest
import torch

from flsl_cli.bench.step import synthetic_batch
from flsl_cli.config.schema import Recipe
from flsl_cli.losses.flsl import attention_modes
from flsl_cli.models.vit import set_fused_attention
from flsl_cli.train.loop import build_runner
from flsl_cli.train.step import TERMS


def _recipe(**optim) -> Recipe:
    return Recipe.model_validate(
        {
            "data": {"train": "x"},
            "model": {
                "arch": "vit_tiny",
                "patch_size": 8,
                "depth": 2,
                "drop_path": 0.1,
                "head_out_dim": 64,
                "head_hidden_dim": 64,
                "head_bottleneck_dim": 32,
            },
            "augment": {"global_size": 32, "local_size": 16},
            "loss": {"query_window_global": 2, "query_window_local": 2},
            "optim": {
                "global_batch_size": 4,
                "epochs": 2,
                "warmup_epochs": 0,
                "freeze_last_layer_epochs": 0,
                "precision": "auto",
                **optim,
            },
        }
    )


def _runner(recipe: Recipe, *, eager: bool):
    runner = build_runner(recipe, device=torch.device("cpu"), rank=0, world_size=1, steps_per_epoch=10)
    for network in (runner.student, runner.teacher):
        set_fused_attention(network.backbone, enabled=not eager)
    return runner


def test_fast_step_equals_the_eager_step_in_loss_terms_and_gradients():
    """Two identical runs, one with fused attention and fused modes, one with explicit softmax
    attention everywhere: each step's four loss terms and every student gradient agree, and the
    weights they lead to stay equal over three steps (drop path and clipping on)."""
    fast, eager = _runner(_recipe(fused_modes=True), eager=False), _runner(_recipe(fused_modes=False), eager=True)
    assert fast.student.backbone.blocks[0].attn.fused_attn and not eager.student.backbone.blocks[0].attn.fused_attn
    batch = synthetic_batch(fast.recipe, images=4, device=torch.device("cpu"))
    for step in range(3):
        fast_terms, eager_terms = fast.run(batch, step=step), eager.run(batch, step=step)
        for name in TERMS:
            assert fast_terms[name] == pytest.approx(eager_terms[name], rel=1e-5, abs=1e-6), name
        grads = [(name, p.grad) for name, p in fast.student.named_parameters() if p.grad is not None]
        eager_grads = {name: p.grad for name, p in eager.student.named_parameters() if p.grad is not None}
        assert len(grads) == len(eager_grads) > 0
        for name, grad in grads:
            torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(fast.student.state_dict().items(), eager.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_fused_modes_equal_explicit_modes_and_their_gradients():
    """softmax(beta z.Z^T) Z computed by scaled_dot_product_attention equals the explicit form,
    values and gradients to queries and tokens, at the betas the recipes use."""
    generator = torch.Generator().manual_seed(0)
    for beta in (0.1 / 384**0.5, 0.2 / 384**0.5, 1.0):
        queries = torch.randn(3, 5, 48, generator=generator, requires_grad=True)
        tokens = torch.randn(3, 36, 48, generator=generator, requires_grad=True)
        fused = attention_modes(queries, tokens, beta=beta, fused=True)
        explicit = attention_modes(queries, tokens, beta=beta)
        torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=2e-5)
        upstream = torch.randn(fused.shape, generator=generator)
        for a, b in zip(
            torch.autograd.grad(fused, (queries, tokens), upstream),
            torch.autograd.grad(explicit, (queries, tokens), upstream),
        ):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


def test_speed_options_are_off_by_default_and_cpu_steps_run_in_fp32():
    """Fused modes and compilation are opt-in; on CPU the step runs in fp32 without a scaler."""
    recipe = _recipe()
    assert not recipe.optim.fused_modes and not recipe.optim.compile
    runner = _runner(recipe, eager=False)
    assert not runner.scaler.is_enabled()
    assert not hasattr(runner.student.backbone.forward_features, "_torchdynamo_orig_callable")


def test_compile_option_compiles_both_backbones_and_keeps_the_weights_keys(monkeypatch):
    """optim.compile: true hands each backbone's feature pass to torch.compile with static
    shapes; the state dicts (checkpoints) keep the plain keys."""
    calls = []

    def fake_compile(fn, **kwargs):
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    plain = _runner(_recipe(), eager=False)
    compiled = _runner(_recipe(compile=True), eager=False)
    assert calls == [{"dynamic": False}, {"dynamic": False}]
    assert list(compiled.student.state_dict()) == list(plain.student.state_dict())
    assert list(compiled.teacher.state_dict()) == list(plain.teacher.state_dict())


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
def test_fast_step_equals_the_eager_step_on_cuda_in_fp32():
    """On a GPU, in fp32 with TF32 off, the fused step (timm's and the modes' fused attention,
    the fused AdamW) gives the eager step's loss terms and gradients."""
    device = torch.device("cuda")
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        runners = []
        for fused in (True, False):
            recipe = _recipe(fused_modes=fused, precision="fp32")
            runner = build_runner(recipe, device=device, rank=0, world_size=1, steps_per_epoch=10)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            for network in (runner.student, runner.teacher):
                set_fused_attention(network.backbone, enabled=fused)
            runners.append(runner)
        batch = synthetic_batch(runners[0].recipe, images=4, device=device)
        fast_terms, eager_terms = (runner.run(batch, step=0) for runner in runners)
        for name in TERMS:
            assert fast_terms[name] == pytest.approx(eager_terms[name], rel=1e-4, abs=1e-5), name
        eager_grads = {n: p.grad for n, p in runners[1].student.named_parameters() if p.grad is not None}
        for name, param in runners[0].student.named_parameters():
            if param.grad is not None:
                torch.testing.assert_close(param.grad, eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@pytest.mark.cuda
@cuda
def test_bf16_step_runs_without_a_scaler_and_stays_near_fp32_on_cuda():
    """precision auto on a bf16 GPU: autocast bf16, no gradient scaler, finite loss terms within
    a few percent of the fp32 step's on the same batch and weights."""
    device = torch.device("cuda")
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    values = {}
    for precision in ("auto", "fp32"):
        runner = build_runner(
            _recipe(precision=precision, fused_modes=True), device=device, rank=0, world_size=1, steps_per_epoch=10
        )
        assert not runner.scaler.is_enabled()
        values[precision] = runner.run(synthetic_batch(runner.recipe, images=8, device=device), step=0)
    for name in TERMS:
        assert values["auto"][name] == pytest.approx(values["fp32"][name], rel=0.05, abs=1e-3), name


@pytest.mark.cuda
@cuda
def test_compiled_step_equals_the_plain_step_on_cuda():
    """optim.compile: true trains as the uncompiled step does (fp32, TF32 off), two steps."""
    device = torch.device("cuda")
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        runners = [
            build_runner(
                _recipe(precision="fp32", compile=flag), device=device, rank=0, world_size=1, steps_per_epoch=10
            )
            for flag in (True, False)
        ]
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        batch = synthetic_batch(runners[0].recipe, images=4, device=device)
        for step in range(2):
            compiled, plain = (runner.run(batch, step=step) for runner in runners)
            for name in TERMS:
                assert compiled[name] == pytest.approx(plain[name], rel=1e-3, abs=1e-5), name
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
