"""What a run of the convergence study is (benchmarks/study.py runs them): its methods and sizes, the settings it
trains with, the switches an ablation may vary, its label in results and tables, and its study key (what makes two
runs comparable). Checked before anything trains: a variant a method does not read, or a level the cache lacks."""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
from pathlib import Path

from ahpa import config as config_mod
from ahpa.align.methods import align_settings_read, get_method, resolve_levels
from ahpa.priors.registry import load_encoder

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STUDY_CONFIG = REPO / "src" / "ahpa" / "configs" / "cifar64-s1.yaml"
# method label -> config overrides; vae-level's level comes from --level. A method registered with the library
# (docs/extending.md) is run too, as align.method=NAME under its own name (method_overrides, study_extensions.py)
METHODS = {
    "none": {"align.method": "none"},
    "vae-latent": {"align.method": "vae-latent"},
    "vae-level": {"align.method": "vae-level"},
    "multi-uniform": {"align.method": "multi-uniform"},
    "ahpa-soft": {"align.method": "ahpa", "align.router": "soft"},
    "ahpa-snr": {"align.method": "ahpa", "align.router": "snr"},
    "ahpa-topk": {"align.method": "ahpa", "align.router": "topk"},
}
DEFAULT_METHODS = ("none", "vae-latent", "vae-level", "multi-uniform", "ahpa-soft", "ahpa-snr")
# a method's own switches (--variant): they name the run (its label) instead of entering the study key, so that
# an ablation of the router or of the levels is compared with the baselines of the same study
VARIANT_KEYS = ("align.levels", "align.shared_trunk", "align.router_tau", "align.router_topk", "align.router_normalize",
                "align.router_entropy", "align.router_momentum", "align.router_t_bins", "align.snr_width",
                "align.stop_step", "align.token_fraction", "align.level_depths")
# the alignment's strength and depth, as a variant of one run: vanilla SiT does not read them, so an ablation of
# lambda or depth can sit beside the study's baselines; the study's own values (flags) stay in the key
RUN_VARIANT_KEYS = (*VARIANT_KEYS, "align.weight", "align.depth", "align.projector_dim")
# the order of a label's variants, whatever the order given: one configuration, one label (its seeds merge). The
# published labels follow it (ahpa-soft[weight=1.5,projector_dim=512], ...[router_normalize=false,router_entropy=0]);
# a registered extension's own settings (align.options.NAME, below) come after them, by name
LABEL_ORDER = ("align.weight", "align.depth", "align.projector_dim", *VARIANT_KEYS)
# a registered method's, loss's or router mode's own settings (docs/extending.md, "Settings of your own"): switches of
# the method, as VARIANT_KEYS are. A variant names its row (method[options.NAME=V]) in the table of its baselines;
# left at their defaults they are the package's code, as its version is (study_extensions.py), not the key's
OPTIONS_PREFIX = "align.options."
SIZES = {
    # smoke: a tiny SiT on 256 cached images at CIFAR's own 32x32 (TAEF2 decodes dominate a CPU evaluation and cost
    # 4x less there than at 64); every code path of the GPU study, none of its statistics
    "smoke": {"limit": 256, "resolution": 32, "grid": 4, "steps": 40, "eval_every": 20, "eval_num": 500,
              "eval_batch": 250, "grid_images": 20,
              "overrides": {"data.resolution": 32, "model.hidden_size": 64, "model.depth": 4, "model.num_heads": 4, "align.depth": 2,
                            "align.projector_dim": 256, "train.batch_size": 16, "train.lr": 1e-3, "train.warmup_steps": 5,
                            "prior.stats_images": 256}},
    # pilot: the largest CPU size worth running (2 cores, ~5 min a run): a small SiT (hidden 96, 6 blocks, 16 tokens)
    # on 4,096 images at 32x32 for 2,000 steps of batch 32, evaluated on 2,000 samples. Not the protocol (model, data,
    # resolution, length and samples are all smaller): indicative of direction at best, never a result
    "pilot": {"limit": 4096, "resolution": 32, "grid": 4, "steps": 2000, "eval_every": 1000, "eval_num": 2000,
              "eval_batch": 500, "grid_images": 20,
              "overrides": {"data.resolution": 32, "model.hidden_size": 96, "model.depth": 6, "model.num_heads": 4, "align.depth": 2,
                            "align.projector_dim": 512, "train.batch_size": 32, "train.lr": 5e-4, "train.warmup_steps": 100,
                            "prior.stats_images": 1024}},
    "gpu": {"limit": 0, "resolution": 64, "grid": 8, "steps": 10000, "eval_every": 2500, "eval_num": 10000, "eval_batch": 1000, "grid_images": 100,
            "overrides": {}},
}


# the power-function EMAs study.py --ema-lengths tracks: EDM2's pair, from whose 16 snapshots a sigma_rel between
# ~0.025 and ~0.255 is reconstructed (ahpa.train.posthoc_track.AUTO_SNAPSHOTS); side outputs, outside the study key
TRACKED_SIGMAS = [0.05, 0.10]


def default_cache(resolution: int, limit: int) -> Path:
    """The TAEF2 cache a study size uses unless --cache names one (shared by every job of that size)."""
    return Path(tempfile.gettempdir()) / f"ahpa-study-cache-taef2-{resolution}-limit{limit}"


def method_overrides(method: str) -> dict:
    """A study method's settings: the table's, or align.method=NAME for a method registered with the library (its
    router mode and loss are its own, or the study config's where it leaves them to align.router / align.loss)."""
    return METHODS.get(method, {"align.method": method})


def study_config(args, size: dict, method: str, variants: bool = True):
    """The run's Config: the project's study config + the size's overrides + the method's (+ the run's variants)."""
    over = {**size["overrides"], **method_overrides(method), "data.source": "cache", "data.path": str(args.cache),
            "prior.encoder": args.encoder, "train.steps": args.steps, "train.seed": args.seed,
            "train.compile": args.compile == "on", "train.compile_mode": args.compile_mode, "train.device": args.device, "train.sample_every": 0,
            "train.log_every": 10**9, "train.ckpt_every": 10**9}
    for key, value in (("align.depth", args.align_depth), ("align.weight", args.align_weight), ("train.lr", args.lr)):
        if value is not None:  # flags override the size's and the study config's values only when given
            over[key] = value
    if method == "vae-level":
        over["align.levels"] = [args.level]
    if getattr(args, "ema_lengths", None):  # snapshots for the reconstructions (study.py ema_lengths)
        over["train.posthoc_ema"] = TRACKED_SIGMAS
    items = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in over.items()]
    return config_mod.load(STUDY_CONFIG, items + (list(args.variant) if variants else []))


def parse_variant(items: list[str]) -> list[str]:
    """Check --variant KEY=VALUE items: only a method's own switches (RUN_VARIANT_KEYS), each once; returned in
    LABEL_ORDER, so that the same ablation typed in another order is the same run."""
    keys = []
    for item in items:
        key = item.partition("=")[0]
        own = key.startswith(OPTIONS_PREFIX) and len(key) > len(OPTIONS_PREFIX)  # checked as a key by the config
        if "=" not in item or (key not in RUN_VARIANT_KEYS and not own):
            raise SystemExit(f"--variant {item!r}: expected KEY=VALUE with KEY one of {', '.join(RUN_VARIANT_KEYS)}, or "
                             f"{OPTIONS_PREFIX}NAME (a setting of a registered method, loss or router mode); other "
                             "settings (lr, steps, model) change every method and make a separate study")
        if key in keys:
            raise SystemExit(f"--variant {key} is given twice: give each switch once")
        keys.append(key)

    def order(item: str) -> tuple[int, str]:
        key = item.partition("=")[0]
        return (LABEL_ORDER.index(key), "") if key in LABEL_ORDER else (len(LABEL_ORDER), key)

    return sorted(items, key=order)


def check_variant_values(args, size: dict, methods: list[str]) -> None:
    """Each --variant value checked as the config checks it (type, range, an extension's setting and its owner),
    before the study reads data or prepares a cache: refused by the flag, not as a traceback of "overrides"."""
    for method in methods:
        study_config(args, size, method, variants=False)  # the study's own settings: an error there is no variant's
        try:
            study_config(args, size, method)
        except config_mod.ConfigError as e:
            raise SystemExit(f"--variant {' '.join(args.variant)}: {str(e).removeprefix('overrides: ')}") from None


def check_methods(args, size: dict, methods: list[str], levels: list[str]) -> None:
    """Every method's configuration, before any trains: a variant the method does not read (router switches on
    multi-uniform: a copy of its baseline under another name, trained for nothing), align.levels on vae-level (its
    --level names the level), and levels the cache lacks fail now, not after the methods before them trained."""
    for method in methods:
        cfg = study_config(args, size, method)
        a = cfg.align
        # a registered method's too: its MethodSpec says what it reads (study_config refused an unknown name)
        reads = align_settings_read(a.method, a.router, a.router_normalize, a.loss) or set()
        unread = [v for v in args.variant if v.partition("=")[0].removeprefix("align.") not in reads]
        if method == "vae-level" and any(v.startswith("align.levels=") for v in args.variant):
            unread.append("align.levels (vae-level aligns the level --level names)")
        if unread:
            raise SystemExit(f"--variant {', '.join(unread)}: {method} does not read it, so the run would be a copy of "
                             f"{method} under another name; give such an ablation with the methods that read it")
        try:
            resolve_levels(get_method(a.method), levels, list(a.levels))
        except ValueError as e:
            raise SystemExit(f"{method}: {e}") from None


def method_label(method: str, args) -> str:
    """The run's name in results and tables: the method, its level for vae-level, and any variant."""
    label = f"vae-level:{args.level}" if method == "vae-level" else method
    if args.variant:
        label += "[" + ",".join(v.removeprefix("align.") for v in args.variant) + "]"
    return label


@functools.lru_cache(maxsize=None)
def encoder_sha256(spec: str) -> str | None:
    """The sha256 of the prior encoder's weights as the library computed it when it loaded them (None when it could
    not: a hub id not in the local cache); loaded once per process."""
    return load_encoder(spec, "cpu").identity()["weights_sha256"]


def encoder_identity(spec: str) -> str:
    """The prior encoder as a study key knows it: its kind and the sha256 of its weights (what a prepared cache
    records), not the path it was read from, so that runs from any checkout or machine share their key."""
    sha = encoder_sha256(spec)
    return f"{spec.partition(':')[0]}:sha256:{sha}" if sha else spec


def settings_but_cadence(config: dict) -> str:
    """A row's settings without the evaluation cadence: study keys whose rows share these are one table
    (study_report.merge_cadences), so study.py and the report check the rows' inputs across them."""
    return json.dumps({k: v for k, v in config.items() if k != "study.eval_every"}, sort_keys=True)


def study_key(cfg, args, size_name: str) -> tuple[str, dict]:
    """What makes two runs comparable: everything but the method's own switches, the device and cadences."""
    flat = config_mod.flatten(cfg.to_dict())
    # the seed is not in the key: runs differ in it by design, and the tables put the seeds side by side
    skip = ("align.method", "align.router", "align.loss", *VARIANT_KEYS, "train.seed", "train.device", "train.compile",
            "train.log_every", "train.ckpt_every", "train.sample_every", "train.keep_checkpoints", "data.path",
            "train.activation_checkpointing", "data.prefetch", "train.compile_mode", "sample.compile",
            # side outputs: the post-hoc EMAs leave the model, its EMA and every evaluation bitwise as they were
            "train.posthoc_ema", "train.posthoc_every",
            "train.wandb", "train.wandb_name")  # these change no math (W&B: a copy of the metrics)
    common = {k: v for k, v in flat.items()
              if k not in skip and not k.startswith(("eval.", "sample.grid", OPTIONS_PREFIX))}
    common["prior.encoder"] = encoder_identity(cfg.prior.encoder)
    common.update({"study.size": size_name, "study.data": args.data.name, "study.limit": args.limit,
                   "study.eval_every": args.eval_every, "study.eval_num": args.eval_num,
                   "study.eval_sampler": "euler-50-cfg1", "study.eval_seed": 0})
    return hashlib.sha256(json.dumps(common, sort_keys=True).encode()).hexdigest()[:12], common
