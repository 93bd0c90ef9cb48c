"""FSDP2 (`fully_shard`) for L and XL models: the backbone, its EMA and the alignment module, sharded
over all processes, while checkpoints stay plain full state dicts.

What is sharded:
- the SiT: each block is one FSDP unit (all-gathered just before it runs, freed after); the root unit
  holds the embedders and the final layer;
- the EMA: sharded exactly like the SiT (same mesh, same Shard(0) placement of every parameter), so its
  update is the usual foreach arithmetic on each process's local shards and no process holds a full copy
  while training; so are train.posthoc_ema's power-function EMAs (ahpa.train.posthoc_track);
- the aligner (projector heads + router): one FSDP unit. It is small (about 10M parameters at XL with
  all SD-VAE levels), but replicating it with DDP would put plain tensors and DTensors into the same
  fused AdamW and clip_grad_norm_ calls, which DTensor refuses; one unit costs one all-gather and one
  reduce-scatter per step.

Checkpoints hold what a plain run holds (`state_dict()` of each module and the optimiser's index-keyed
`state_dict()`), gathered with torch.distributed.checkpoint.state_dict, so a run may change between
FSDP, DDP and one process on resume, and `ahpa export` reads any of them.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh

try:  # public from torch 2.6; torch 2.4 and 2.5 have it under _composable
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # pragma: no cover - torch < 2.6 only
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard


def mixed_precision(device: torch.device, amp: torch.dtype | None) -> MixedPrecisionPolicy | None:
    """bf16 unsharded parameters on CUDA when the run uses bf16; fp32 everywhere else.

    Autocast stays on around the forward passes (the loop is the same with and without FSDP): it keeps
    the op-level policy of a plain bf16 run (matmuls in bf16, normalisation, softmax and losses in
    fp32). FSDP's bf16 parameters add what autocast cannot: half-size all-gathers and unsharded
    weights. Inputs are not cast (cast_forward_inputs=False): t must reach the sinusoidal embedding in
    fp32, where bf16 (8 significant bits) would round t * 1000 to steps of 4 near t = 1. Gradients are reduced
    in fp32 and the sharded parameters, the EMA and the optimiser state stay fp32.
    """
    if device.type == "cuda" and amp == torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return None


def _shard_sit(model: nn.Module, mesh, mp: MixedPrecisionPolicy | None) -> None:
    kw = {"mesh": mesh} if mp is None else {"mesh": mesh, "mp_policy": mp}
    for block in model.blocks:
        fully_shard(block, **kw)
    # the root's parameters (embedders, final layer) are small and needed again at once by backward
    fully_shard(model, reshard_after_forward=False, **kw)


class PlainCopy:
    """How to rebuild an unsharded copy of a module: its structure on the meta device (no memory) and
    its non-persistent buffers (e.g. SiT's fixed position embedding), which no state dict carries."""

    def __init__(self, module: nn.Module):
        saved = module.state_dict().keys()
        self.extra = {n: b.detach().cpu().clone() for n, b in module.named_buffers() if n not in saved}
        # deepcopy with every tensor pre-mapped to a meta twin: the structure is copied, the data never is
        memo = {id(t): (nn.Parameter(t.detach().to("meta"), t.requires_grad) if isinstance(t, nn.Parameter)
                        else t.detach().to("meta")) for t in [*module.parameters(), *module.buffers()]}
        self.skeleton = copy.deepcopy(module, memo)

    def build(self, state: dict, device: torch.device) -> nn.Module:
        m = copy.deepcopy(self.skeleton).to_empty(device=device)
        m.load_state_dict(state)  # strict: every parameter and persistent buffer is overwritten
        for name, value in self.extra.items():
            owner, _, leaf = name.rpartition(".")
            m.get_submodule(owner).register_buffer(leaf, value.to(device), persistent=False)
        return m.requires_grad_(False).eval()


class Sharded:
    """A run's model, EMA and aligner under FSDP2, with a new optimiser over the sharded parameters.

    fully_shard keeps a module's current values, so build and load the plain modules first: weights
    then start (and resume) exactly as in a plain run. Only the optimiser, whose parameters sharding
    replaces, is rebuilt here; load its state afterwards with `load_optimizer_state`.
    Every method that returns full state is a collective: all processes must call it.
    """

    def __init__(self, parts, world: int):
        from ahpa.train.build import build_optimizer

        if parts.device.type != "cuda" and torch.__version__ < "2.6":
            # FSDP2 of torch 2.4 and 2.5 creates CUDA streams whatever the device (seen with torch 2.4.1 on the CPU:
            # "CUDA driver version is insufficient"); torch 2.6 picks them by device
            raise ValueError(f"train.fsdp=true on {parts.device.type} needs torch >= 2.6 (this is {torch.__version__}): "
                             "set train.fsdp=false (DDP), or install a newer torch")
        self.parts, self.device = parts, parts.device
        sit = PlainCopy(parts.model)  # the EMA has the same structure
        self.copies = {"model": sit, "ema": sit, **({"aligner": PlainCopy(parts.aligner)} if parts.aligner is not None else {})}
        mesh = init_device_mesh(parts.device.type, (world,))
        mp = mixed_precision(parts.device, parts.amp)
        _shard_sit(parts.model, mesh, mp)
        _shard_sit(parts.ema, mesh, None)  # never run sharded: the placements are what must match the model
        for copy_ in parts.posthoc.copies if parts.posthoc is not None else []:  # train.posthoc_ema's, as the EMA
            _shard_sit(copy_, mesh, None)
        if parts.aligner is not None:
            fully_shard(parts.aligner, mesh=mesh, reshard_after_forward=False, **({"mp_policy": mp} if mp else {}))
        parts.optimizer = build_optimizer(parts.cfg, parts.model, parts.aligner)
        # the optimiser's parameters and their names in one module: get/set_optimizer_state_dict key the
        # state by these names, our checkpoints by the index in this order (plain optimizer.state_dict())
        self.trained = nn.ModuleDict({k: m for k, m in (("model", parts.model), ("aligner", parts.aligner)) if m is not None})
        named = list(self.trained.named_parameters())
        params = parts.optimizer.param_groups[0]["params"]
        if len(named) != len(params) or any(a is not b for (_, a), b in zip(named, params)):
            raise RuntimeError("the optimiser's parameters are not the model's then the aligner's, in module order")
        self.names = [n for n, _ in named]

    def _modules(self) -> dict[str, nn.Module]:
        p = self.parts
        powers = {f"posthoc_{i}": m for i, m in enumerate(p.posthoc.copies)} if p.posthoc is not None else {}
        return {**{k: m for k, m in (("model", p.model), ("ema", p.ema), ("aligner", p.aligner)) if m is not None},
                **powers}

    def full_state(self, name: str, everywhere: bool = False) -> dict:
        """parts.<name>'s plain full state dict: on CPU on rank 0 and {} elsewhere, or on every
        process's device with `everywhere` (for evaluation, where all processes sample)."""
        opts = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
        return get_model_state_dict(self._modules()[name], options=opts)

    def plain(self, name: str, everywhere: bool = False) -> nn.Module | None:
        """An unsharded, frozen copy of parts.<name> on this process's device (None where it gets no state)."""
        state = self.full_state(name, everywhere)
        return self.copies[name].build(state, self.device) if state else None

    def optimizer_state(self) -> dict:
        """The optimiser's full state in the form of a plain `optimizer.state_dict()` (rank 0; {} elsewhere)."""
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        named = get_optimizer_state_dict(self.trained, self.parts.optimizer, options=opts)
        if not named:
            return {}
        index = {n: i for i, n in enumerate(self.names)}
        return {
            "state": {index[n]: s for n, s in named["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]],
        }

    def load_optimizer_state(self, state: dict) -> None:
        """Loads a plain `optimizer.state_dict()` (every process passes the whole of it)."""
        named = {
            "state": {self.names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [self.names[i] for i in g["params"]]} for g in state["param_groups"]],
        }
        # keyword: optim_state_dict is keyword-only in some torch versions
        set_optimizer_state_dict(self.trained, self.parts.optimizer, optim_state_dict=named,
                                 options=StateDictOptions(full_state_dict=True))
