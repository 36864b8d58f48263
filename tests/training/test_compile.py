"""``model.compile``: torch.compile of the net gives the eager net's loss, and what a compiled
fit saves loads without compiling."""

import copy

import pytest
import torch

from tests.conftest import compose_tiny
from tumorseg.models import UNet
from tumorseg.train import run
from tumorseg.training.losses import RegionLoss
from tumorseg.training.module import (
    COMPILE_MIN_STEPS_CPU,
    compile_choice,
    load_checkpoint,
    should_compile,
)

# Inductor fuses and reorders fp32 reductions (batch norm statistics, the loss's sums): the
# loss may differ from eager in the last bits, not more than this (relative).
LOSS_RTOL = 1e-4


def test_compiled_net_gives_the_eager_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    eager = UNet(4, 3, [8, 16, 32])
    compiled = copy.deepcopy(eager)
    compiled.compile()
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(4, 4, 64, 64, generator=gen)
    regions = torch.rand(4, 3, 64, 64, generator=gen) > 0.7
    loss_fn = RegionLoss()
    losses = []
    for net in (eager, compiled):
        loss = loss_fn(net(image).float(), regions)
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=LOSS_RTOL)
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5)


def test_compile_choice_and_auto_rule():
    assert [compile_choice(v) for v in (False, "false", True, "true", "auto")] == [
        False,
        False,
        True,
        True,
        "auto",
    ]
    with pytest.raises(ValueError, match="model.compile"):
        compile_choice("sometimes")
    assert should_compile("auto", "cuda", 10)
    assert not should_compile("auto", "cpu", COMPILE_MIN_STEPS_CPU - 1)
    assert should_compile("auto", "cpu", COMPILE_MIN_STEPS_CPU) == (COMPILE_MIN_STEPS_CPU > 0)
    assert should_compile(True, "cpu", 1) and not should_compile(False, "cuda", 10**6)


def test_checkpoint_of_a_compiled_fit_loads_without_compiling(tmp_path, demo_root):
    cfg = compose_tiny(
        tmp_path,
        demo_root,
        [
            "model.compile=true",
            "trainer.max_epochs=1",
            "~logger",
            "~callbacks.lr_monitor",
            "test=false",
        ],
    )
    run(cfg)
    ckpt = tmp_path / "out" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert state and not [k for k in state if "_orig_mod" in k]
    module = load_checkpoint(ckpt)
    assert getattr(module.net, "_compiled_call_impl", None) is None  # plain eager net
    assert type(module.net) is UNet
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        assert module(x).shape == (2, 3, 64, 64)
