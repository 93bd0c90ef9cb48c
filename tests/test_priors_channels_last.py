"""Channels-last frozen encoders (faster cuDNN convolutions on GPUs): the same levels, latents and decodes as the
default layout, switched on by the in-step source on CUDA only."""

from __future__ import annotations

import pytest
import torch

from ahpa.data.batches import OnTheFly
from ahpa.data.sources import ImageSet
from ahpa.priors.kl_vae import KLVAE
from ahpa.priors.taef2 import TAEF2Encoder


def _encoders():
    torch.manual_seed(0)
    yield "ahpa-vae", KLVAE.random()
    yield "taef2", TAEF2Encoder()  # random weights: the layout question does not depend on them
    try:
        from ahpa.priors.diffusers_vae import DiffusersVAE
    except ImportError:
        return
    yield "diffusers", DiffusersVAE.from_config({"block_out_channels": [16, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
                                                 "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1,
                                                 "norm_num_groups": 8, "latent_channels": 4})
    from tests.test_priors_diffusers_classes import DCAE, FLUX2

    for name, config in (("diffusers-flux2", FLUX2), ("diffusers-dcae", DCAE)):
        torch.manual_seed(0)
        yield name, DiffusersVAE.from_config(config)


@pytest.mark.parametrize("name,encoder", list(_encoders()), ids=lambda v: v if isinstance(v, str) else "")
def test_channels_last_gives_the_same_outputs(name, encoder):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    levels = [n for n in encoder.level_names if n != "latent"]
    ref = encoder.encode(x, levels)
    rec_ref = encoder.decode(ref.mean)
    encoder.use_memory_format(torch.channels_last)
    convs = [m.weight for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    out = encoder.encode(x, levels)
    first = out.features[levels[0]]
    assert first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous()  # the layout it ran in
    # the same convolutions with another order of additions: float32 rounding only
    scale = ref.mean.abs().max()
    assert torch.allclose(out.mean, ref.mean, atol=1e-5 * scale), (out.mean - ref.mean).abs().max()
    for level in levels:
        a, b = out.features[level], ref.features[level]
        assert torch.allclose(a, b, atol=1e-5 * b.abs().max()), (level, (a - b).abs().max())
    assert torch.allclose(encoder.decode(ref.mean), rec_ref, atol=1e-5)


def test_the_in_step_source_switches_to_channels_last_on_cuda_only():
    data = ImageSet(torch.zeros(4, 16, 16, 3, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64), 1)
    vae = KLVAE.random()
    OnTheFly(data, vae, ["latent"], 4, 16, torch.device("cpu"))
    assert vae.memory_format == torch.contiguous_format and vae.conv_in.weight.is_contiguous()
    OnTheFly(data, vae, ["latent"], 4, 16, torch.device("cuda"))  # builds without touching the device
    assert vae.memory_format == torch.channels_last
    assert vae.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
