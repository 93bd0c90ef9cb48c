"""The EMA update (ahpa.train.ema.ema_update) as one foreach lerp: the same averages as the sub, mul and add it
replaced, a skipped step (`keep` = 1) that moves nothing, no full-size temporary and no read-back to the host."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ahpa.models.sit import SiT, SiTConfig
from ahpa.train.ema import ema_decay, ema_update
from ahpa.train.posthoc_ema import power_beta


def three_passes(ema: list[torch.Tensor], model: list[torch.Tensor], decay: float, keep: torch.Tensor | None) -> None:
    """The update before the lerp, as the reference: ema += w * (model - ema) in three foreach calls."""
    diff = torch._foreach_sub(model, ema)
    w = 1.0 - decay if keep is None else (1 - keep.to(ema[0].dtype)) * (1.0 - decay)
    torch._foreach_mul_(diff, w)
    torch._foreach_add_(ema, diff)


SHAPES = [(24, 8), (24,), (8,), (1, 3, 5), (), (16, 4, 2, 2)]  # of every rank, a 0-dim one too


# decays as the run gives them: warm-up (w = 0.9 at n = 0, lerp's other branch), power-function beta (w = 1 at t = 1)
DECAYS = [ema_decay(n, 0.999, True) for n in range(6)] + [power_beta(6.94, t) for t in (1, 2, 7)] + [0.9999, 0.5]
KEEPS = [None, 0.0, 1.0, 0.0, None, 1.0, 1.0, 0.0, None, 0.0, 1.0]  # training passes keep on every step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_lerp_gives_the_three_pass_average_over_steps_with_and_without_keep(dtype):
    """fp32 is what training runs (the EMA and its copies are fp32 copies of the fp32 model, under FSDP's bf16 too),
    fp64 what the post-hoc tests run; bf16 occurs nowhere today and is held to its own rounding. The model moves every
    step, and on a skipped step (keep 1) the EMA stays bitwise as it was."""
    g = torch.Generator().manual_seed(0)
    ema = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
    ref = [t.clone() for t in ema]
    for decay, keep in zip(DECAYS, KEEPS, strict=True):
        model = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]
        before = [t.clone() for t in ema]
        k = None if keep is None else torch.tensor(keep)
        ema_update(ema, model, decay, keep=k)
        three_passes(ref, [p.detach() for p in model], decay, k)
        assert all(t.dtype == dtype for t in ema)
        if keep == 1.0:
            assert all(torch.equal(a, b) for a, b in zip(ema, before))
        eps = torch.finfo(dtype).eps
        for a, b in zip(ema, ref):  # values of size ~1: a rounding or two apart (2 eps seen, 2.5 in bf16)
            torch.testing.assert_close(a, b, rtol=0, atol=4 * eps)


class _Ops(TorchDispatchMode):
    """Every operator's name and the elements of the new tensors it returned (outputs that are not its inputs)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.new_elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        self.names.append(func.overloadpacket.__name__)
        self.new_elements += sum(t.numel() for t in tree_flatten(out)[0]
                                 if isinstance(t, torch.Tensor) and t.data_ptr() not in given)
        return out


@pytest.mark.parametrize("keep", [None, 0.0, 1.0])
def test_the_update_allocates_no_copy_of_the_parameters_and_reads_nothing_back(keep):
    """On a tiny SiT's parameters: the operators the update runs return nothing larger than the 0-dim weight (the
    sub it replaced returned a full copy, this test's failure on the old code), and none reads a value back to the
    host (`.item()`, `float(t)`: `_local_scalar_dense`) or makes a tensor from host values (`torch.tensor`:
    `lift_fresh`), either of which waits for the GPU's queued work."""
    model = SiT(SiTConfig(input_size=8, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10))
    ema = SiT(model.cfg).requires_grad_(False)
    trained, averaged = list(model.parameters()), list(ema.parameters())
    k = None if keep is None else torch.tensor(keep)
    with _Ops() as ops:
        ema_update(averaged, trained, 0.99, keep=k)
    assert ops.new_elements <= 2, f"the update allocated {ops.new_elements} elements ({ops.names})"
    assert "_foreach_lerp_" in ops.names
    assert not {"_local_scalar_dense", "lift_fresh", "item"} & set(ops.names), ops.names


@pytest.mark.parametrize("keep", [0.0, 1.0])
def test_keep_weights_each_parameter_in_its_own_dtype(keep):
    """Parameters of several dtypes in one call (bf16 listed first): each is averaged at its own precision, as
    ema + (1 - decay) * (model - ema) in fp64 rounded once, and a skipped step leaves them all bitwise as they were.
    A weight made in the first parameter's dtype only would round 1 - decay = 0.1 to bf16's 0.10009765625 for the
    fp64 one (torch 2.13 accepts that weight; 2.4 refuses it)."""
    g = torch.Generator().manual_seed(1)
    dtypes = [torch.bfloat16, torch.float64, torch.float32, torch.float64]
    ema = [torch.randn(5, 3, generator=g).to(d) for d in dtypes]
    model = [torch.nn.Parameter(torch.randn(5, 3, generator=g).to(d)) for d in dtypes]
    before = [t.clone() for t in ema]
    ema_update(ema, model, 0.9, keep=torch.tensor(keep))
    for e, b, m in zip(ema, before, model, strict=True):
        assert e.dtype == b.dtype
        if keep:
            assert torch.equal(e, b)
        else:
            want = b.double() + 0.1 * (m.detach().double() - b.double())
            torch.testing.assert_close(e.double(), want, rtol=0, atol=4 * torch.finfo(e.dtype).eps)


def test_the_ema_takes_no_autograd_history_from_the_parameters_that_train():
    """The model's parameters require grad (the EMA's do not); ema_update reads them under no_grad, with no detach:
    the EMA stays leaf tensors without a graph. A lerp recorded by autograd would chain every step's EMA to the
    last, and keep every step's graph alive."""
    model = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    ema = [torch.nn.Parameter(p.detach().clone(), requires_grad=False) for p in model]
    for keep in (None, torch.zeros(()), torch.ones(())):
        ema_update(ema, model, 0.9, keep=keep)
        assert all(e.is_leaf and e.grad_fn is None and not e.requires_grad for e in ema)
