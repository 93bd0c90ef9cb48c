"""ahpa convert --checkpoint FILE --layout dit|sit|repa|auto --out FILE.safetensors: a released model as an ahpa export.

The export is what `ahpa export` writes (see ahpa.sample.export_model), so `ahpa sample --model` and
`ahpa eval` work on released SiT / REPA models unchanged. The key mapping and time conventions are in
ahpa.models.convert; docs/evaluation.md has the table.
"""

from __future__ import annotations

SD_VAE_SCALE = 0.18215  # the latent scaling every public DiT / SiT / REPA model was trained with (zero shift)
SD_VAE_FACTOR = 8


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a released DiT / SiT / REPA checkpoint into an ahpa export")
    p.add_argument("--checkpoint", required=True, help="released .pt / .pth / .safetensors file")
    p.add_argument("--layout", default="auto", choices=("dit", "sit", "repa", "auto"),
                   help="public layout (auto: REPA by its projector keys, DiT / SiT by the file name)")
    p.add_argument("--preset", help="size/patch, e.g. XL/2: checks the checkpoint's shapes (default: read from them)")
    p.add_argument("--num-heads", type=int, help="attention heads, for non-standard sizes without --preset")
    p.add_argument("--out", required=True, help="output .safetensors (ahpa export format)")
    p.add_argument("--encoder", required=True,
                   help="VAE spec stored in the export, not loaded here: the models of DiT, SiT and REPA decode with "
                   "SD-VAE, e.g. diffusers:weights/sd-vae-ft-ema (a local copy, stored as an absolute path) or "
                   "diffusers:stabilityai/sd-vae-ft-ema (a hub id: sampling the export downloads it)")
    p.add_argument("--resolution", type=int, help="image side (default: latent side x 8, the SD-VAE factor)")
    p.add_argument("--latent-scale", type=float, default=SD_VAE_SCALE,
                   help="the model saw latent * scale (zero mean): stored as per-channel std 1/scale (default: SD-VAE's 0.18215)")
    p.add_argument("--path", default="linear", choices=("linear", "cosine"),
                   help="interpolant the model was trained on (SiT GVP = cosine after conversion; default linear)")
    p.add_argument("--use", default="ema", choices=("ema", "model"), help="which weights of a training checkpoint (default ema)")
    p.add_argument("--trust-pickle", action="store_true", help="allow arbitrary pickled objects (only files you trust)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ahpa.config import absolute_spec
    from ahpa.models.convert import convert_checkpoint
    from ahpa.priors.registry import parse_spec
    from ahpa.priors.targets import ChannelStats
    from ahpa.sample import export_model

    kind, _ = parse_spec(args.encoder)  # fail on a bad spec before the (slow) conversion
    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out {args.out!r} must end in .safetensors (the ahpa export format)")
    if args.latent_scale <= 0:
        raise ValueError(f"--latent-scale must be positive, got {args.latent_scale}")
    if args.layout == "dit":
        raise ValueError(
            "a DiT checkpoint predicts noise at discrete VP steps, not a velocity: an export would sample wrongly "
            "with ahpa's samplers. Load its weights in Python with ahpa.models.convert.load_public_checkpoint("
            "FILE, 'dit', convention='native') (see docs/evaluation.md)"
        )
    conv = convert_checkpoint(args.checkpoint, args.layout, preset=args.preset, num_heads=args.num_heads,
                              use=args.use, allow_pickle=args.trust_pickle)
    cfg = conv.config
    resolution = args.resolution
    if resolution is None:
        if kind != "diffusers":
            raise ValueError(f"--resolution is needed with a {kind}: encoder (its factor is not assumed to be {SD_VAE_FACTOR})")
        resolution = cfg.input_size * SD_VAE_FACTOR
    elif kind == "diffusers" and resolution != cfg.input_size * SD_VAE_FACTOR:
        raise ValueError(f"--resolution {resolution} does not match the checkpoint's latent side {cfg.input_size} x "
                         f"SD-VAE factor {SD_VAE_FACTOR} = {cfg.input_size * SD_VAE_FACTOR}")
    model = conv.build()
    c = cfg.in_channels
    stats = ChannelStats(mean=torch.zeros(c), std=torch.full((c,), 1.0 / args.latent_scale))
    # a local VAE path made absolute (a hub id stays as given), as ahpa export stores it: the export then samples
    # from any directory, not only from where `ahpa convert` ran
    path = export_model(args.out, model, stats, absolute_spec(args.encoder), args.path, resolution)
    for note in conv.notes:
        print(f"  {note}")
    print(f"converted {conv.layout} checkpoint ({model.num_params():,} parameters; hidden {cfg.hidden_size}, depth "
          f"{cfg.depth}, patch {cfg.patch_size}, latent {c}x{cfg.input_size}x{cfg.input_size}) to {path}")
    return 0
