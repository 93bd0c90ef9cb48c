"""`ahpa prepare` on a folder of real-world files (bad ones included) through a randomly initialised
AutoencoderKL with the exact SD-VAE configuration; decoding, the ADM crop, bad paths, the CLI.

The SD-VAE encoder costs ~0.2 s per 32x32 image and ~3.5 s per 256x256 image on two CPU cores, so the
50-file folder is prepared at 32 (the code path does not depend on R) and one image at 256 checks the real
geometry: five levels at 1/2..1/8 pooled to the 16x16 grid and the bytes per image stated in docs/data.md.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ahpa.data.cache import open_cache, read_manifest
from ahpa.data.decode import BadImage, adm_center_crop, load_rgb
from ahpa.data.listing import list_source
from ahpa.data.prepare import PrepareError, PrepareOptions, prepare
from ahpa.data.shard_store import CacheError

SD_CONFIG = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "sd-vae-ft-ema.config.json"
SD_LEVELS = ["down0", "down1", "down2", "down3", "mid", "latent"]


# ---------------------------------------------------------------- files
def _rgb(rng, h, w) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, format="JPEG", **kw)
    return b.getvalue()


def make_folder(root: Path) -> dict[str, str]:
    """~50 files in two class folders; returns {relative name: what is special about it}."""
    rng = np.random.default_rng(0)
    special = {}
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for k in range(19):
            img = _rgb(rng, int(rng.integers(32, 80)), int(rng.integers(32, 80)))
            img.save(root / cls / f"img_{k:03d}.{'jpg' if k % 2 else 'png'}")
    c = root / "cats"
    full = _jpeg_bytes(_rgb(rng, 64, 64))
    (c / "bad_truncated.jpg").write_bytes(full[: len(full) // 2])
    (c / "bad_empty.png").write_bytes(b"")
    (c / "bad_notes.jpg").write_text("not an image, despite the name")
    special |= {"cats/bad_truncated.jpg": "skip", "cats/bad_empty.png": "skip", "cats/bad_notes.jpg": "skip"}
    Image.new("L", (40, 40), 90).save(c / "odd_grey.png")
    Image.new("LA", (40, 40), (90, 0)).save(c / "odd_grey_alpha.png")
    pal = Image.new("P", (40, 40), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(0, (30, 30, 40, 40))  # a transparent corner (index 0): a key no pixel uses is no transparency
    pal.save(c / "odd_palette_transparent.png", transparency=0)
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(c / "odd_cmyk.jpg")
    Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(c / "odd_16bit.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    _rgb(rng, 36, 60).save(c / "odd_rotated.jpg", exif=exif.tobytes())
    _rgb(rng, 12, 20).save(c / "odd_tiny.png")  # smaller than R: upsampled
    Image.new("RGBA", (40, 40), (0, 0, 255, 128)).save(c / "odd_rgba.png")
    (c / "readme.txt").write_text("ignored: not an image extension")
    return special


@pytest.fixture(scope="module")
def sd_vae_dir(tmp_path_factory) -> Path:
    if not SD_CONFIG.is_file():
        pytest.skip(f"SD-VAE reference config not found at {SD_CONFIG} (the shared/ directory beside the repository)")
    from ahpa.priors.diffusers_vae import DiffusersVAE

    torch.manual_seed(0)
    vae = DiffusersVAE.from_config(json.loads(SD_CONFIG.read_text()))
    where = tmp_path_factory.mktemp("sdvae") / "sd-vae-random"
    vae.vae.save_pretrained(where)  # diffusers:DIR needs a directory
    return where


@pytest.fixture(scope="module")
def sd_vae(sd_vae_dir):
    from ahpa.priors.registry import load_encoder

    return load_encoder(f"diffusers:{sd_vae_dir}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images") / "photos"
    make_folder(root)
    return root


@pytest.fixture(scope="module")
def folder_cache(folder, sd_vae, sd_vae_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "sd32"
    opts = PrepareOptions(images=str(folder), vae=f"diffusers:{sd_vae_dir}", resolution=32, out=str(out), batch=16,
                          workers=2, shard_size=24, flips="generated")
    res = prepare(opts, encoder=sd_vae)
    assert res.complete and res.items == 49 and res.images == 46
    return out


# ---------------------------------------------------------------- decoding
def test_modes_become_rgb_correctly(folder):
    c = folder / "cats"
    assert load_rgb(c / "odd_grey.png")[0][0, 0].tolist() == [90, 90, 90]
    assert load_rgb(c / "odd_grey_alpha.png")[0][0, 0].tolist() == [255, 255, 255]  # transparent -> white
    assert load_rgb(c / "odd_palette_transparent.png")[0][0, 0].tolist() == [255, 0, 0]
    arr, conv = load_rgb(c / "odd_16bit.png")
    assert arr[0, 0].tolist() == [156, 156, 156] and "16-bit" in conv[0]  # 40000 / 257, not clipped to 255
    assert (np.abs(load_rgb(c / "odd_cmyk.jpg")[0][0, 0].astype(int) - [255, 0, 0]) < 8).all()
    rgba = load_rgb(c / "odd_rgba.png")[0][0, 0].tolist()
    assert rgba == [127, 127, 255] or rgba == [128, 128, 255]  # half-transparent blue over white
    arr, conv = load_rgb(c / "odd_rotated.jpg")
    assert arr.shape == (60, 36, 3) and conv == ["EXIF orientation 6 applied"]


@pytest.mark.parametrize("name, reason", [("bad_truncated.jpg", "truncated"), ("bad_empty.png", "empty file"),
                                          ("bad_notes.jpg", "not an image"), ("missing.png", "does not exist")])
def test_bad_files_raise_with_a_reason(folder, name, reason):
    with pytest.raises(BadImage, match=reason):
        load_rgb(folder / "cats" / name)


def _reference_center_crop_arr(pil_image, image_size):  # guided-diffusion image_datasets.py, verbatim
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


@pytest.mark.parametrize("h, w, r", [(300, 451, 64), (64, 80, 64), (517, 260, 128)])
def test_adm_center_crop_is_the_reference(h, w, r):
    arr = np.random.default_rng(h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    assert np.array_equal(adm_center_crop(arr, r), _reference_center_crop_arr(Image.fromarray(arr), r))


# ---------------------------------------------------------------- sources and bad paths
def test_sources_list_labels(folder, tmp_path):
    listing = list_source(folder)
    assert len(listing) == 49 and listing.class_names == ["cats", "dogs"] and listing.ignored == ["cats/readme.txt"]
    assert listing.labels.tolist() == [0] * 30 + [1] * 19
    lst = tmp_path / "files.txt"
    lst.write_text(f"# a comment\n{folder}/dogs/img_001.jpg\t3\n\n{folder}/cats/odd_tiny.png\t0\n")
    listed = list_source(lst)
    assert listed.labels.tolist() == [3, 0] and listed.num_classes == 4
    lst.write_text(f"{folder}/dogs/img_001.jpg\t3\n{folder}/cats/odd_tiny.png\n")
    with pytest.raises(ValueError, match="files.txt:2"):
        list_source(lst)


def test_hidden_entries_are_left_out_and_the_labels_source_is_said(folder, tmp_path):
    """Hidden folders and files (.ipynb_checkpoints, .DS_Store) are no classes or images; the labels line says where
    the labels come from: the sub-folders (the first five named), a list's or an npz's labels, or none; --labels none
    is what was asked for, so no doubt is raised over a stray image."""
    root = tmp_path / "hidden"
    for name in ("a", "b", "c", "d", "e", "f", ".ipynb_checkpoints"):
        (root / name).mkdir(parents=True)
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / name / "x.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "a" / ".x-copy.png")
    listing = list_source(root)
    assert listing.class_names == ["a", "b", "c", "d", "e", "f"] and len(listing) == 6 and not listing.ignored
    assert listing.labels_text() == "6 class(es) from the sub-folder names (a, b, c, d, e, ...)"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "stray.png")
    asked = list_source(root, "none")
    assert asked.labels_text() == "none (--labels none)" and asked.label_doubt == ""
    assert list_source(root).label_doubt  # the same folder with labels left to `auto`: a doubt, with the fix
    lst = tmp_path / "files.txt"
    lst.write_text(f"{folder}/dogs/img_001.jpg\t3\n{folder}/cats/odd_tiny.png\t0\n")
    assert list_source(lst).labels_text() == "4 class(es), from the list's labels"
    lst.write_text(f"{folder}/dogs/img_001.jpg\n{folder}/cats/odd_tiny.png\n")
    assert list_source(lst).labels_text() == "none (the source gives no labels)"


def test_linked_class_folders_are_listed_and_a_link_back_up_is_not_followed(folder, tmp_path):
    """Class folders linked from elsewhere were silently dropped (os.walk does not follow links by default): 3 of 4
    classes lost without a word. A link to a folder above would make the walk endless: it is not followed."""
    root = tmp_path / "linked"
    root.mkdir()
    (root / "cats").symlink_to(folder / "cats", target_is_directory=True)
    (root / "dogs").symlink_to(folder / "dogs", target_is_directory=True)
    (root / "dogs-again").symlink_to(folder / "dogs", target_is_directory=True)  # one folder under two names: both
    (root / "real").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "real" / "a.png")
    (root / "real" / "loop").symlink_to(root, target_is_directory=True)  # back up to the top: not followed
    listing = list_source(root)
    assert listing.class_names == ["cats", "dogs", "dogs-again", "real"]
    assert len(listing) == 30 + 19 + 19 + 1 and listing.labels_text().startswith("4 class(es) from the sub-folder")


def test_a_stray_image_beside_class_folders_is_said_to_turn_the_labels_off(folder, tmp_path, capsys):
    """One image at the top level beside the class folders makes the source unlabelled (the documented rule): said
    on the console with the fix, not only visible in the manifest."""
    from ahpa.cli import main

    root = tmp_path / "stray"
    shutil.copytree(folder / "dogs", root / "dogs")
    shutil.copytree(folder / "cats", root / "cats")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "IMG_stray.png")
    listing = list_source(root)
    assert listing.class_names is None and "1 image(s) lie at the top level" in listing.labels_text()
    args = ["prepare", "--images", str(root), "--vae", "ahpa-vae:random", "--resolution", "16", "--workers", "0",
            "--flips", "none", "--limit", "4"]
    warning = (f"warning: labels: none: 1 image(s) lie at the top level of {root} (e.g. 'IMG_stray.png') beside 2 "
               "sub-folder(s) of images, so the sub-folders are not read as classes; move the top-level images")
    assert main([*args, "--out", str(tmp_path / "c")]) == 0
    out, err = capsys.readouterr()
    assert warning in err and "labels:" not in out  # said once, as the warning
    assert main([*args, "--out", str(tmp_path / "c")]) == 0  # the rerun, a no-op, says it again
    out, err = capsys.readouterr()
    assert "already complete" in out and warning in err
    (root / "IMG_stray.png").unlink()
    assert main([*args, "--out", str(tmp_path / "c2")]) == 0
    assert "labels: 2 class(es) from the sub-folder names (cats, dogs)" in capsys.readouterr().out


def test_a_cache_is_not_written_among_other_files(folder, tmp_path, capsys):
    """--out naming the image folder itself (or a folder inside it), or a non-empty directory that is no cache (a
    run directory), is refused before any work; a cache's own files without a manifest (a first attempt that
    stopped early) are resumed."""
    from ahpa.cli import main

    args = ["prepare", "--images", str(folder / "dogs"), "--vae", "ahpa-vae:random", "--resolution", "16",
            "--workers", "0", "--flips", "none", "--limit", "2", "--out"]
    for out, message in [(folder / "dogs", "lies inside the image folder --images"),
                         (folder / "dogs" / "cache", "lies inside the image folder --images")]:
        assert main([*args, str(out)]) == 2
        assert message in capsys.readouterr().err
    assert not (folder / "dogs" / "manifest.json").exists() and not (folder / "dogs" / "cache").exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("x: 1\n")
    assert main([*args, str(run)]) == 2
    assert (f"--out {run} holds other files (config.yaml) and no cache of `ahpa prepare`" in capsys.readouterr().err)
    for name in ("metrics.jsonl", "checkpoints", "model.safetensors"):
        (run / name).write_text("")
    assert main([*args, str(run)]) == 2
    assert f"--out {run} holds other files (checkpoints, config.yaml, metrics.jsonl, ...)" in capsys.readouterr().err
    stopped = tmp_path / "stopped"
    (stopped / "shards").mkdir(parents=True)
    assert main([*args, str(stopped)]) == 0
    (stopped / "NOTES.txt").write_text("prepared for the study\n")  # a cache, with its manifest: a rerun is no-op
    assert main([*args, str(stopped)]) == 0
    assert "already complete" in capsys.readouterr().out
    hidden = tmp_path / "hidden-only"
    hidden.mkdir()
    (hidden / ".DS_Store").write_bytes(b"")  # what a file browser leaves: not the files of something else
    assert main([*args, str(hidden)]) == 0


def test_bad_paths_fail_before_any_work(tmp_path, folder):
    never = "diffusers:/nonexistent/vae"  # would fail if it were ever loaded: the path errors come first
    def opts(images, out):
        return PrepareOptions(images=str(images), vae=never, resolution=32, out=str(out))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(opts(tmp_path / "nope", tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        prepare(opts(tmp_path / "empty", tmp_path / "out"))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CacheError, match="a_file is a file"):
        prepare(opts(folder, tmp_path / "a_file" / "cache"))
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(CacheError, match="not writable"):
            prepare(opts(folder, ro / "cache"))
    with pytest.raises(FileNotFoundError, match="nonexistent"):  # only now the VAE, and nothing was created
        prepare(opts(folder, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the folder through SD-VAE
def test_folder_is_prepared_with_bad_files_reported(folder_cache):
    m = read_manifest(folder_cache)
    assert m["count"] == 46 and m["skipped"] == 3 and m["class_names"] == ["cats", "dogs"]
    assert [l["name"] for l in m["levels"]] == SD_LEVELS[:-1] and m["latent"]["moments"] == ["mean", "logvar"]
    assert m["grid"] == 2 and m["fields"]["level.down0"]["shape"] == [4, 128]
    report = json.loads((folder_cache / "report.json").read_text())
    assert sorted(n for n, _ in report["skipped"]) == ["cats/bad_empty.png", "cats/bad_notes.jpg", "cats/bad_truncated.jpg"]
    assert all(reason for _, reason in report["skipped"])
    conv = report["conversions"]
    for key in ("L->RGB", "LA+alpha->RGB (composited on white)", "P+alpha->RGB (composited on white)", "CMYK->RGB",
                "I;16->RGB (16-bit rescaled)", "EXIF orientation 6 applied", "RGBA+alpha->RGB (composited on white)"):
        assert conv.get(key) == 1, (key, conv)
    assert conv["upsampled (smaller than R)"] == 1 and report["ignored_files"] == ["cats/readme.txt"]


def test_strict_fails_on_the_first_bad_file(folder, sd_vae, sd_vae_dir, tmp_path):
    opts = PrepareOptions(images=str(folder), vae=f"diffusers:{sd_vae_dir}", resolution=32, out=str(tmp_path / "c"),
                          batch=8, workers=0, strict=True)
    with pytest.raises(PrepareError, match=r"cats/bad_empty.png: empty file.*--strict"):
        prepare(opts, encoder=sd_vae)
    with pytest.raises(CacheError, match="incomplete"):
        read_manifest(tmp_path / "c")


def test_sd_vae_cache_trains_and_samples_posterior(folder_cache, sd_vae_dir, tmp_path):
    from ahpa import config as config_mod
    from ahpa.train.loop import Trainer

    cfg = config_mod.from_dict({
        "model": {"preset": "S/2", "hidden_size": 32, "depth": 2, "num_heads": 2},
        "data": {"source": "cache", "path": str(folder_cache), "resolution": 32},
        "prior": {"encoder": f"diffusers:{sd_vae_dir}"},
        "align": {"method": "multi-uniform", "depth": 1, "projector_dim": 32},
        "train": {"steps": 2, "batch_size": 8, "log_every": 1, "ckpt_every": 2, "sample_every": 0, "device": "cpu"},
    })
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.parts.levels == SD_LEVELS and trainer.parts.model.cfg.num_classes == 2
    src = trainer.parts.source
    idx = torch.tensor([0, 1])
    mean = src.fetch(idx, None, None).latent
    sampled = src.fetch(idx, None, torch.ones(2, 4, 4, 4)).latent
    assert not torch.equal(mean, sampled)  # the posterior is sampled with the trainer's noise
    last = trainer.run()
    assert trainer.step == 2 and np.isfinite(last["loss/flow"]) and np.isfinite(last["loss/align"])


def test_one_image_at_256_has_the_documented_geometry(sd_vae, sd_vae_dir, tmp_path):
    big = tmp_path / "big.jpg"
    _rgb(np.random.default_rng(1), 300, 420).save(big)
    lst = tmp_path / "one.txt"
    lst.write_text("big.jpg\t0\n")  # relative to the list's folder
    opts = PrepareOptions(images=str(lst), vae=f"diffusers:{sd_vae_dir}", resolution=256, out=str(tmp_path / "c"),
                          batch=1, workers=0, flips="none")
    res = prepare(opts, encoder=sd_vae)
    m = read_manifest(tmp_path / "c")
    assert m["grid"] == 16 and [(l["name"], l["channels"], l["stride"]) for l in m["levels"]] == [
        ("down0", 128, 2), ("down1", 256, 4), ("down2", 512, 8), ("down3", 512, 8), ("mid", 512, 8)]
    per_level = {k: 2 * int(np.prod(v["shape"])) for k, v in m["fields"].items() if v["dtype"] == "fp16"}
    assert per_level == {"latent_mean": 8192, "latent_logvar": 8192, "level.down0": 65536, "level.down1": 131072,
                         "level.down2": 262144, "level.down3": 262144, "level.mid": 262144}  # docs/data.md table
    data = sum(f["bytes"] for s in m["shards"] for k, f in s["files"].items() if k != "stats")
    assert res.images == 1 and data == sum(per_level.values()) + 16  # + label and source index (int64 each)
    cfg = type("C", (), {})()
    from ahpa import config as config_mod

    cfg = config_mod.from_dict({"data": {"source": "cache", "path": str(tmp_path / "c"), "resolution": 256, "hflip": False}})
    b = open_cache(cfg, sd_vae, SD_LEVELS, 16, torch.device("cpu")).fetch(torch.tensor([0]), None, None)
    assert b.latent.shape == (1, 4, 32, 32) and b.levels["down0"].shape == (1, 256, 128) and b.levels["latent"].shape == (1, 256, 4)


def test_one_image_at_512_has_the_documented_geometry_and_trains_the_512_config(sd_vae, sd_vae_dir, tmp_path):
    """At 512 the levels are pooled to the 32x32 grid of a /2 SiT (four times 256's bytes: docs/data.md's 512 table),
    and configs/imagenet512-xl2.yaml, shrunk, trains from that cache: 1,024 tokens with their position embeddings,
    every level routed. (~25 s: the SD-VAE encoder at 512 on two CPU cores.)"""
    from ahpa import config as config_mod
    from ahpa.train.loop import Trainer

    _rgb(np.random.default_rng(2), 600, 800).save(tmp_path / "big.jpg")
    (tmp_path / "one.txt").write_text("big.jpg\t0\n")
    opts = PrepareOptions(images=str(tmp_path / "one.txt"), vae=f"diffusers:{sd_vae_dir}", resolution=512,
                          out=str(tmp_path / "c"), batch=1, workers=0, flips="none")
    assert prepare(opts, encoder=sd_vae).images == 1
    m = read_manifest(tmp_path / "c")
    per_level = {k: 2 * int(np.prod(v["shape"])) for k, v in m["fields"].items() if v["dtype"] == "fp16"}
    assert m["grid"] == 32 and per_level == {"latent_mean": 32768, "latent_logvar": 32768, "level.down0": 262144,
                                             "level.down1": 524288, "level.down2": 1048576, "level.down3": 1048576,
                                             "level.mid": 1048576}
    data = sum(f["bytes"] for s in m["shards"] for k, f in s["files"].items() if k != "stats")
    assert data == sum(per_level.values()) + 16 == 3_997_712
    preset = Path(__file__).resolve().parents[1] / "configs" / "imagenet512-xl2.yaml"
    cfg = config_mod.load(preset, [f"data.path={tmp_path / 'c'}", "data.hflip=false", f"prior.encoder=diffusers:{sd_vae_dir}",
                                   "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "align.depth=1",
                                   "align.projector_dim=32", "train.steps=1", "train.batch_size=1", "train.compile=false",
                                   "train.sample_every=0", "train.ema_warmup=true", "train.device=cpu"])
    trainer = Trainer(cfg, tmp_path / "run", encoder=sd_vae)
    model = trainer.parts.model
    assert model.cfg.grid == 32 and model.pos_embed.shape == (1, 1024, 32) and trainer.parts.levels == SD_LEVELS
    assert trainer.parts.aligner.router.num_levels == len(SD_LEVELS)
    last = trainer.run()
    assert trainer.step == 1 and np.isfinite(last["loss/flow"]) and np.isfinite(last["loss/align"])


def test_cli_prepare_reports_and_is_a_noop_on_rerun(folder, tmp_path, capsys):
    from ahpa.cli import main

    out = tmp_path / "c"
    args = ["prepare", "--images", str(folder / "dogs"), "--vae", "ahpa-vae:random", "--resolution", "16",
            "--out", str(out), "--workers", "0", "--flips", "none", "--limit", "6"]
    assert main(args) == 0
    assert "6 images from 6 source items" in capsys.readouterr().out
    assert main(args) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(args[:-1] + ["5"]) == 2
    assert "source.count: cache has 6, this command gives 5" in capsys.readouterr().err
    assert main(["prepare", "--images", str(tmp_path / "nope"), "--vae", "ahpa-vae:random", "--resolution", "16",
                 "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    # files that are not images by their extension are named on the console too, not only in report.json
    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(loose / f"{i}.png")
    (loose / "notes.txt").write_text("not an image")
    assert main(["prepare", "--images", str(loose), "--vae", "ahpa-vae:random", "--resolution", "16", "--out",
                 str(tmp_path / "c2"), "--workers", "0", "--flips", "none"]) == 0
    assert "ignored 1 file(s) without an image extension (notes.txt;" in capsys.readouterr().err


def test_a_cache_larger_than_the_free_space_is_refused_before_any_work(folder, tmp_path, capsys, monkeypatch):
    """At 512 every level with stored flips is 10 TB for ImageNet, and a disk that filled days into the encoding left
    a cache whose options cannot change without starting again. prepare now refuses, before it writes anything, the
    shards that need more bytes than the disk holding --out has free, naming both figures and the options that store
    less; a resume counts only the shards it lacks; --no-space-check skips it."""
    from types import SimpleNamespace

    from ahpa.cli import main
    from ahpa.data.shard_encoder import ShardEncoder

    def args(out, *extra):
        return ["prepare", "--images", str(folder / "dogs"), "--vae", "ahpa-vae:random", "--resolution", "16", "--out",
                str(out), "--workers", "0", "--flips", "none", "--limit", "6", "--shard-size", "2", "--batch", "2", *extra]

    assert main(args(tmp_path / "whole")) == 0
    m = read_manifest(tmp_path / "whole")
    per_image = sum(f["bytes"] for k, f in m["shards"][0]["files"].items() if k != "stats") // 2
    capsys.readouterr()
    free = {"bytes": 6 * per_image - 1}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=free["bytes"]))
    assert main(args(tmp_path / "new")) == 2
    err = capsys.readouterr().err
    assert f"the cache needs up to {6 * per_image / 1e3:.1f} kB more ({per_image:,} B per image x 6 images to encode)" in err
    assert "--flips generated or none halves it" in err and "--no-space-check" in err
    assert not (tmp_path / "new").exists()
    # a resume needs room for the shards it lacks only
    real_open = ShardEncoder._open

    def killed_at_the_second_shard(self, i, writer):
        if i == 1:
            raise KeyboardInterrupt
        return real_open(self, i, writer)

    free["bytes"] = 10**15
    monkeypatch.setattr(ShardEncoder, "_open", killed_at_the_second_shard)
    assert main(args(tmp_path / "part")) == 130
    monkeypatch.setattr(ShardEncoder, "_open", real_open)
    free["bytes"] = 4 * per_image - 1
    assert main(args(tmp_path / "part")) == 2
    assert "x 4 images to encode" in capsys.readouterr().err
    free["bytes"] = 4 * per_image
    assert main(args(tmp_path / "part")) == 0
    free["bytes"] = 0  # a complete cache is a no-op whatever the disk holds
    assert main(args(tmp_path / "part")) == 0 and "already complete" in capsys.readouterr().out
    assert main(args(tmp_path / "unchecked", "--no-space-check")) == 0


def test_a_resumed_prepare_bar_starts_at_the_shards_there(folder, tmp_path, capsys, monkeypatch):
    """Resumed, the bar counted the shards already there as encoded in its first second (a walkthrough's rate read 28
    img/s where it encoded 21); it now starts at them, so that tqdm's rate is of the images this launch encodes."""
    from ahpa.cli import main
    from ahpa.data.shard_encoder import ShardEncoder

    real_open = ShardEncoder._open

    def killed_at_the_second_shard(self, i, writer):
        if i == 1:
            raise KeyboardInterrupt
        return real_open(self, i, writer)

    args = ["prepare", "--images", str(folder / "dogs"), "--vae", "ahpa-vae:random", "--resolution", "16",
            "--out", str(tmp_path / "c"), "--workers", "0", "--flips", "none", "--limit", "6", "--shard-size", "2",
            "--batch", "2"]
    monkeypatch.setattr(ShardEncoder, "_open", killed_at_the_second_shard)
    assert main(args) == 130
    capsys.readouterr()
    monkeypatch.setattr(ShardEncoder, "_open", real_open)
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "shards written 2, kept 1" in out
    assert "| 2/6 [" in err and "| 6/6 [" in err and "| 0/6 [" not in err


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGHUP"])
def test_a_scheduler_signal_stops_prepare_as_ctrl_c_does(folder, tmp_path, capsys, monkeypatch, signum):
    """SIGTERM (a scheduler's preemption) and SIGHUP ended `ahpa prepare` without a word or its clean-up (exit -15);
    as `ahpa sample`, it now says what Ctrl-C says, exits 128 + the signal, keeps the shards written and gives the
    handlers back; the rerun goes on from them."""
    import os
    import signal

    from ahpa.cli import main
    from ahpa.data.shard_encoder import ShardEncoder

    sig = getattr(signal, signum)
    before = signal.getsignal(sig)
    real_open = ShardEncoder._open

    def signalled_at_the_second_shard(self, i, writer):
        if i == 1:
            os.kill(os.getpid(), sig)
        return real_open(self, i, writer)

    args = ["prepare", "--images", str(folder / "dogs"), "--vae", "ahpa-vae:random", "--resolution", "16",
            "--out", str(tmp_path / "c"), "--workers", "0", "--flips", "none", "--limit", "6", "--shard-size", "2",
            "--batch", "2"]
    monkeypatch.setattr(ShardEncoder, "_open", signalled_at_the_second_shard)
    assert main(args) == 128 + sig
    assert "interrupted; rerun the same command to resume" in capsys.readouterr().err
    assert signal.getsignal(sig) is before
    monkeypatch.setattr(ShardEncoder, "_open", real_open)
    assert main(args) == 0
    assert "shards written 2, kept 1" in capsys.readouterr().out


def test_vae_train_reads_a_folder_as_prepare_does(folder, tmp_path, capsys):
    from ahpa.cli import main
    from ahpa.data.listing import decode_all
    from ahpa.priors.kl_vae import KLVAE

    images, skipped = decode_all(list_source(folder), 16)
    assert images.dtype == np.uint8 and images.shape[1:] == (16, 16, 3)
    assert sorted(name for name, _ in skipped) == ["cats/bad_empty.png", "cats/bad_notes.jpg", "cats/bad_truncated.jpg"]
    listing = list_source(folder)
    first = next(listing.paths[i] for i in range(len(listing)) if listing.name(i) not in dict(skipped))
    np.testing.assert_array_equal(images[0], adm_center_crop(load_rgb(first)[0], 16))  # the pixels prepare encodes
    out = tmp_path / "vae"
    assert main(["vae-train", "--images", str(folder), "--resolution", "16", "--out", str(out), "--steps", "2",
                 "--batch", "4", "--channels", "8,8", "--workers", "0"]) == 0
    captured = capsys.readouterr()
    assert f"trained on {len(images)} images of 16x16" in captured.out and "skipped cats/bad_empty.png" in captured.err
    assert KLVAE.from_dir(out).factor == 2
    assert main(["vae-train", "--images", str(folder), "--out", str(out)]) == 2
    assert "add --resolution R" in capsys.readouterr().err


def test_a_small_diffusers_vae_prepares(tmp_path):
    """The manifest's probe of the encoder runs at the real resolution: at the VAE factor's side (2x2 for a
    two-block VAE) a GroupNorm of 32 channels in 32 groups saw one value each and failed."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1).save_pretrained(tmp_path / "vae")
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "set.npz", images=images, labels=np.arange(8) % 2)
    res = prepare(PrepareOptions(images=str(tmp_path / "set.npz"), vae=f"diffusers:{tmp_path / 'vae'}", resolution=16,
                                 out=str(tmp_path / "cache"), workers=0, shard_size=8, flips="none"))
    assert res.complete and res.images == 8


def test_labels_follow_their_images_past_skipped_files(tmp_path):
    """with bad files skipped, every stored row keeps the label of the file it came from (shards of 4 and
    batches of 2, so that skips fall inside and at the ends of batches and shards)."""
    from PIL import Image

    from ahpa.data.cache import CacheSource, read_manifest
    from ahpa.data.prepare import PrepareOptions, prepare

    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    for cls, n in (("a", 5), ("b", 4), ("c", 3)):
        (root / cls).mkdir(parents=True)
        for k in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / cls / f"{k}.png")
    (root / "a" / "0_bad.png").write_bytes(b"")  # sorted first in a/: a skip at a shard's start
    (root / "b" / "2_bad.png").write_text("no image")
    res = prepare(PrepareOptions(images=str(root), vae="ahpa-vae:random", resolution=16, out=str(tmp_path / "c"),
                                 grid=2, shard_size=4, batch=2, workers=0, device="cpu", flips="none"))
    assert res.images == 12 and len(res.skipped) == 2
    src = CacheSource(tmp_path / "c", read_manifest(tmp_path / "c"), ["latent"], 2, torch.device("cpu"))
    assert src.labels.tolist() == [0] * 5 + [1] * 4 + [2] * 3


def test_the_names_of_a_runs_classes_come_from_its_data(tmp_path):
    """`ahpa sample --class NAME` and exports name classes as the data did: a cache of class folders by the folders'
    names (in label order), an .npz by its class_names array, the procedural set by its shapes; data that names none,
    or that is not on this machine, gives None (classes are then given by index)."""
    from ahpa.config import DataCfg
    from ahpa.data.class_names import class_names

    root = tmp_path / "imgs"
    for c in ("zebra", "ant"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    prepare(PrepareOptions(images=str(root), vae="ahpa-vae:random", resolution=16, out=str(tmp_path / "cache"),
                           workers=0, flips="none"))
    assert class_names(DataCfg(source="cache", path=str(tmp_path / "cache"))) == ["ant", "zebra"]
    np.savez(tmp_path / "named.npz", images=np.zeros((2, 8, 8, 3), np.uint8), labels=np.arange(2),
             class_names=np.array(["cat", "dog"]))
    np.savez(tmp_path / "plain.npz", images=np.zeros((2, 8, 8, 3), np.uint8), labels=np.arange(2))
    assert class_names(DataCfg(source="npz", path=str(tmp_path / "named.npz"))) == ["cat", "dog"]
    assert class_names(DataCfg(source="npz", path=str(tmp_path / "plain.npz"))) is None
    assert class_names(DataCfg(source="npz", path=str(tmp_path / "moved.npz"))) is None
    assert class_names(DataCfg(source="cache", path=str(tmp_path / "moved"))) is None
    assert class_names(DataCfg(source="procedural"))[:2] == ["warm disc", "warm square"]


def test_a_folder_without_images_and_a_class_whose_files_were_all_skipped_are_said(tmp_path, capsys):
    """A user's class folders: one empty (or holding only notes), one whose only file is corrupt. The empty one was
    dropped without a word (four folders, three classes); the corrupt one kept its class index with no image, so the
    model had a class that never trained and class-balanced grids and evaluations drew from it, unsaid."""
    from ahpa.cli import main

    root = tmp_path / "mine"
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.full((16, 16, 3), 60 * k, np.uint8)).save(root / cls / f"{k}.png")
    (root / "birds").mkdir()
    (root / "birds" / "only.jpg").write_text("not an image")
    (root / "empty").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("label these")
    listing = list_source(root)
    assert listing.class_names == ["birds", "cats", "dogs"]
    assert listing.labels_text() == ("3 class(es) from the sub-folder names (birds, cats, dogs); 2 sub-folder(s) "
                                     "without image files, not classes: empty, notes")
    args = ["prepare", "--images", str(root), "--vae", "ahpa-vae:random", "--resolution", "16", "--workers", "0",
            "--flips", "none", "--out", str(tmp_path / "c")]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "not classes: empty, notes" in out
    assert "warning: 1 class(es) hold no image in the cache (every file of theirs was skipped, or the source names " \
           "none): birds." in err
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["images_per_class"] == {"birds": 0, "cats": 2, "dogs": 2}
    assert main(args) == 0  # the rerun, a no-op, says it again
    out, err = capsys.readouterr()
    assert "already complete" in out and "hold no image in the cache" in err
    (root / "birds" / "only.jpg").unlink()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "birds" / "only.png")
    assert main([*args[:-1], str(tmp_path / "c2")]) == 0
    assert "hold no image" not in capsys.readouterr().err
    # --limit cuts the sorted listing after the first class folders: the warning said files were skipped or the source
    # named none, and to fix or remove files, where the cause was the limit
    assert main([*args[:-1], str(tmp_path / "c3"), "--limit", "3"]) == 0
    err = capsys.readouterr().err
    assert "warning: 1 class(es) hold no image in the cache (--limit 3 keeps the first 3 source items" in err
    assert "dogs. The model still has a class" in err and "give --per-class N instead of --limit" in err
    assert "fix or remove" not in err
    # --per-class 1 keeps the first image of every class: none is empty
    assert main([*args[:-1], str(tmp_path / "c4"), "--per-class", "1"]) == 0
    assert "hold no image" not in capsys.readouterr().err
    report = json.loads((tmp_path / "c4" / "report.json").read_text())
    assert report["images_per_class"] == {"birds": 1, "cats": 1, "dogs": 1}
    # a --limit above the source's items cut nothing: a class without an image is the files' doing, as without it
    (root / "birds" / "only.png").write_text("not an image")
    assert main([*args[:-1], str(tmp_path / "c5"), "--limit", "100"]) == 0
    err = capsys.readouterr().err
    assert "(every file of theirs was skipped, or the source names none): birds" in err and "--per-class" not in err


def test_per_class_keeps_the_first_items_of_each_class_in_the_source_order(tmp_path):
    """`--per-class N`: a subset of every class (--limit's first N items of a sorted folder are its first classes).
    Labels interleaved as a file list or an .npz may give them; then --limit after it."""
    from ahpa.data.listing import first_of_each_class

    labels = np.array([2, 0, 2, 1, 0, 2, 0, 1, 2])
    assert first_of_each_class(labels, 2).tolist() == [0, 1, 2, 3, 4, 7]
    assert first_of_each_class(labels, 1).tolist() == [0, 1, 3]
    assert first_of_each_class(labels, 9).tolist() == list(range(9))
    assert first_of_each_class(np.zeros(0, np.int64), 3).tolist() == []
    images = np.arange(9, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    listing = list_source(tmp_path / "d.npz", per_class=2)
    assert listing.labels.tolist() == [2, 0, 2, 1, 0, 1] and listing.array[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 7]
    assert list_source(tmp_path / "d.npz", per_class=2, limit=4).labels.tolist() == [2, 0, 2, 1]
    lines = "".join(f"{i}.png\t{y}\n" for i, y in enumerate(labels))
    (tmp_path / "l.txt").write_text(lines)
    listing = list_source(tmp_path / "l.txt", per_class=1)
    assert [p.name for p in listing.paths] == ["0.png", "1.png", "3.png"] and listing.labels.tolist() == [2, 0, 1]
    # a listing of ImageNet's size: each class's first items in the source's order, not those a sort left first
    many = np.random.default_rng(0).integers(0, 10, 5000)
    first = [i for i, y in enumerate(many) if (many[:i] == y).sum() < 3]
    assert first_of_each_class(many, 3).tolist() == first
    # a count below 0 is refused, not taken for "none of any class"
    with pytest.raises(PrepareError, match="--per-class must be >= 0, got -1"):
        prepare(PrepareOptions(images=str(tmp_path / "d.npz"), vae="ahpa-vae:random", resolution=16,
                               out=str(tmp_path / "c"), per_class=-1))


def test_the_manifest_names_a_local_vae_by_its_absolute_path_and_older_manifests_still_match(tmp_path, monkeypatch,
                                                                                              capsys):
    """`--vae ahpa-vae:vae` was recorded as typed, so a mismatch met by a run started elsewhere named a folder relative
    to where prepare ran; and an encoder without a weights hash (matched by its spec) never matched a run's, whose
    paths are absolute. Older manifests keep their relative spec: they still match."""
    from ahpa.cli import main
    from ahpa.data.cache import check_encoder
    from ahpa.data.procedural import make_shapes
    from ahpa.priors import registry
    from ahpa.priors.kl_vae import KLVAE

    monkeypatch.setattr(registry.ENCODERS, "entries", dict(registry.ENCODERS.entries))

    def unhashed(where, spec):  # a package's kind that records no weights hash: a cache knows it by its spec
        enc = KLVAE.from_dir(where)
        enc.weights_sha256 = None
        return enc

    registry.register_encoder("plainvae", unhashed)
    KLVAE.random(0).save(tmp_path / "vae")
    KLVAE.random(1).save(tmp_path / "other")
    images, labels = make_shapes(4, 16, seed=0)
    np.savez(tmp_path / "set.npz", images=images, labels=labels)
    (tmp_path / "elsewhere").mkdir()
    for kind in ("ahpa-vae", "plainvae"):
        monkeypatch.chdir(tmp_path)
        out = tmp_path / f"cache-{kind}"
        args = ["prepare", "--images", "set.npz", "--vae", f"{kind}:vae", "--resolution", "16", "--out", str(out),
                "--workers", "0", "--flips", "none"]
        assert main(args) == 0
        file = out / "manifest.json"
        manifest = json.loads(file.read_text())
        assert manifest["encoder"]["spec"] == f"{kind}:{tmp_path / 'vae'}"
        check_encoder(manifest, registry.load_encoder(f"{kind}:vae"), out)  # a Python caller's relative path
        monkeypatch.chdir(tmp_path / "elsewhere")  # a run started in another directory, paths absolute as a run's are
        check_encoder(manifest, registry.load_encoder(f"{kind}:{tmp_path / 'vae'}"), out)
        if kind == "ahpa-vae":
            with pytest.raises(CacheError, match=rf"cache was encoded by '{kind}:{tmp_path / 'vae'}' \(sha256"):
                check_encoder(manifest, registry.load_encoder(f"{kind}:{tmp_path / 'other'}"), out)
        # an older manifest, the path as typed: the same command finds it complete, and a run from its directory
        # takes it
        monkeypatch.chdir(tmp_path)
        file.write_text(file.read_text().replace(f'"{kind}:{tmp_path / "vae"}"', f'"{kind}:vae"'))
        capsys.readouterr()
        assert main(args) == 0 and "already complete" in capsys.readouterr().out
        check_encoder(json.loads(file.read_text()), registry.load_encoder(f"{kind}:{tmp_path / 'vae'}"), out)
    # a hashed VAE's folder moved: the same weights, so prepare finds its cache complete (the spec is not compared)
    (tmp_path / "vae").rename(tmp_path / "moved")
    moved = ["prepare", "--images", "set.npz", "--vae", "ahpa-vae:moved", "--resolution", "16", "--out",
             str(tmp_path / "cache-ahpa-vae"), "--workers", "0", "--flips", "none"]
    capsys.readouterr()
    assert main(moved) == 0 and "already complete" in capsys.readouterr().out
