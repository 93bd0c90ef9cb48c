"""`ahpa compare` reads runs that differ only in train.seed as one method: the mean of its seeds, their spread, and
speed-ups paired seed by seed (ahpa/compare_seeds.py)."""

import pytest

from ahpa.cli import main
from tests.test_compare import _evaluated, _rows


def _seeds(root, method, *curves, **changed):
    """A run per curve of one method, seeds 0, 1, ... (`changed`: seed -> overrides of that seed's run)."""
    return [_evaluated(root, f"{method}-s{seed}", fds, f"align.method={method}", f"train.seed={seed}",
                       *changed.get(f"s{seed}", ())) for seed, fds in enumerate(curves)]


def test_seeds_of_one_method_are_one_row_the_mean_of_their_curves(tmp_path, capsys, monkeypatch):
    """Four runs, two methods of two seeds each, were four rows with speed-ups read against one baseline seed and
    train.seed listed as a difference: now two rows, each the mean of its seeds, speed-ups between the means."""
    from ahpa.train import plots

    runs = [*_seeds(tmp_path, "none", [10.0, 8.0, 6.0], [10.4, 8.4, 6.4]),
            *_seeds(tmp_path, "ahpa", [9.0, 7.0, 5.0], [9.4, 7.4, 5.4])]
    drawn, real = {}, plots.line_plot

    def line_plot(series, path, *args, **kw):
        drawn[path.name] = series, args, kw
        return real(series, path, *args, **kw)

    monkeypatch.setattr(plots, "line_plot", line_plot)
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "cmp")]) == 0
    text = capsys.readouterr().out
    rows = _rows(text)
    assert text.startswith("# 4 runs; baseline none-s0 (2 seeds: 0, 1)\n")
    assert set(rows) == {"run", "none-s0 (2 seeds: 0, 1) (baseline)", "ahpa-s0 (2 seeds: 0, 1)"}
    # the baseline's mean ends at 6.2; ahpa's mean (9.2, 7.2, 5.2) crosses it at 250 images: 300 / 250
    assert "| 300 | 6.200 | 6.200 | 6.200 | 300 | 1.00x |" in rows["none-s0 (2 seeds: 0, 1) (baseline)"]
    assert "| 300 | 5.200 | 5.200 | 5.200 | 250 | 1.20x |" in rows["ahpa-s0 (2 seeds: 0, 1)"]
    assert ("- none-s0 (2 seeds: 0, 1): none-s0 (seed 0), none-s1 (seed 1); FD-r20 at 300 images (the last every seed "
            "was evaluated at): mean 6.200, seeds 6.000-6.400 (n=2)") in text
    assert "- `train.seed`" not in text and "left out" not in text and "Not read as seeds" not in text
    # the plot: each group's mean as its line, its seeds' own curves beside it (faint)
    series, args, kw = drawn["FD-r20.png"]
    mean = series["ahpa-s0 (2 seeds: 0, 1)"]
    assert [x for x, _ in mean] == [100, 200, 300] and [y for _, y in mean] == pytest.approx([9.2, 7.2, 5.2])
    assert kw["faint"]["ahpa-s0 (2 seeds: 0, 1)"] == [[(100, 9.0), (200, 7.0), (300, 5.0)], [(100, 9.4), (200, 7.4), (300, 5.4)]]
    assert args[2] == "FD-r20 (a group of seeds: their mean, each seed faint)" and (tmp_path / "cmp" / "FD-r20.png").is_file()
    assert len(drawn["flow-loss.png"][2]["faint"]["none-s0 (2 seeds: 0, 1)"]) == 2
    # --baseline by any of a group's runs (name or path) names its group
    assert main(["compare", *map(str, runs), "--baseline", str(runs[3])]) == 0
    assert "| 1.00x |" in _rows(capsys.readouterr().out)["ahpa-s0 (2 seeds: 0, 1) (baseline)"]


def test_speed_ups_are_paired_seed_by_seed_and_told_against_the_seed_spread(tmp_path, capsys):
    none = _seeds(tmp_path / "a", "none", [10.0, 8.0, 6.0], [10.4, 8.4, 6.4])
    ahead = _seeds(tmp_path / "a", "ahpa", [9.0, 7.0, 5.0], [9.4, 7.4, 5.4])
    assert main(["compare", *map(str, none + ahead)]) == 0
    text = capsys.readouterr().out
    assert ("- ahpa-s0 (2 seeds: 0, 1): 1.20x between the mean curves; 1.20x (seed 0), 1.20x (seed 1): ahead of the "
            "baseline at every paired seed. At 300 images its seeds' FD-r20 5.000-5.400, the baseline's seeds "
            "6.000-6.400: all below the baseline's, beyond the seed spread") in text
    # seed 1 never reaches its baseline's 6.4: ahead at one seed of two, and the seeds' values overlap
    mixed = _seeds(tmp_path / "b", "ahpa", [9.0, 7.0, 5.0], [10.6, 8.6, 6.6])
    assert main(["compare", *map(str, none + mixed)]) == 0
    text = capsys.readouterr().out
    assert ("1.07x between the mean curves; 1.20x (seed 0), not reached (seed 1): ahead of the baseline at 1 of 2 "
            "paired seeds. At 300 images its seeds' FD-r20 5.000-6.600, the baseline's seeds 6.000-6.400: the ranges "
            "overlap, within the seed spread") in text
    # a run alone of another seed: no seed to pair with, its value against the baseline's seeds
    other = _evaluated(tmp_path, "repa-s2", [9.0, 7.0, 6.1], "align.method=repa", "train.seed=2")
    assert main(["compare", *map(str, none), str(other)]) == 0
    text = capsys.readouterr().out
    assert ("- repa-s2: 1.04x between it and the baseline's mean curve; no seed in common with the baseline, so none is "
            "paired") in text and "At 300 images its FD-r20 6.100, the baseline's seeds 6.000-6.400: the ranges overlap" in text
    # train.seed differs between rows that are not seeds of one method: listed, and why
    assert ("- `train.seed`: none-s0 (2 seeds: 0, 1)=[0, 1], repa-s2=2 (runs that differ in other settings too are not "
            "read as seeds of one method)") in text


def test_a_seed_evaluated_at_other_points_is_left_out_of_the_mean_there(tmp_path, capsys):
    """A seed trained longer, and one whose evaluation at 200 images is missing: the mean is over the images every
    seed was evaluated at (100 and 300), and the output names the points left out."""
    base = _evaluated(tmp_path, "none", [10.0, 8.0, 6.0], "align.method=none")
    runs = _seeds(tmp_path, "ahpa", [9.0, 7.0, 5.0], [9.4, None, 5.4, 5.0, 4.0], [9.2, 7.4, 5.2])
    assert main(["compare", str(base), *map(str, runs)]) == 0
    text = capsys.readouterr().out
    rows = _rows(text)
    # the mean (9.2 at 100, 5.2 at 300) crosses 6.0 at 100 + 200 x 3.2 / 4 = 260 images: 300 / 260
    assert "| ahpa-s0 (3 seeds: 0, 1, 2) | ahpa (soft) | 300 | 5.200 | 5.200 | 5.200 | 260 | 1.15x |" in rows[
        "ahpa-s0 (3 seeds: 0, 1, 2)"]
    assert ("mean 5.200, seeds 5.000-5.400 (n=3); left out of the mean, as not every seed was evaluated there: ahpa-s0 at "
            "200; ahpa-s1 at 400, 500; ahpa-s2 at 200 images") in text
    from ahpa import compare_seeds

    curves = [[(100, 9.0), (200, 7.0)], [(100, 8.0), (150, 7.5), (200, 6.0)]]
    assert compare_seeds.mean_curve(curves) == ([(100, 8.5), (200, 6.5)], [[], [150]])
    # the baseline alone and a group of seeds: seed 0 paired with it, read at the points of the group's mean
    assert "ahead of the baseline at every paired seed" in text and "1.15x between its mean curve and the baseline" in text


def test_runs_of_other_seeds_that_cannot_be_one_method_say_why_and_grouping_can_be_switched_off(tmp_path, capsys):
    none = _seeds(tmp_path, "none", [10.0, 8.0, 6.0], [10.4, 8.4, 6.4])
    assert main(["compare", *map(str, none), "--no-group-seeds"]) == 0
    text = capsys.readouterr().out
    assert set(_rows(text)) >= {"none-s0 (baseline)", "none-s1"} and "Seeds read as one method" not in text
    assert "- none-s0, none-s1: grouping of seeds is switched off (--no-group-seeds)" in text
    assert "- `train.seed`: none-s0=0, none-s1=1 (not read as seeds of one method: see above)" in text
    # the same seed twice (a rerun beside a second seed): which one is the seed's is not compare's to choose
    again = _evaluated(tmp_path, "none-s0-again", [10.0, 8.0, 6.0], "align.method=none", "train.seed=0")
    assert main(["compare", *map(str, none), str(again)]) == 0
    assert ("- none-s0, none-s1, none-s0-again: seed 0 is given twice (none-s0, none-s0-again): a rerun or a copy is no "
            "other seed") in capsys.readouterr().out
    # a copy of one seed alone is no group and needs no word (as before seeds were grouped)
    assert main(["compare", str(none[0]), str(again)]) == 0
    text = capsys.readouterr().out
    assert "Seeds read as one method" not in text and "Not read as seeds" not in text and "- `train.seed`" not in text
    # seeds evaluated with other samples, or never at the same images, do not average
    fewer = _evaluated(tmp_path, "ahpa-s1", [9.0, 7.0, 5.0], "align.method=ahpa", "train.seed=1",
                       setup="eval.num=100 sampler=euler-50 guidance=[0.0, 1.0]")
    ahpa = _evaluated(tmp_path, "ahpa-s0", [9.0, 7.0, 5.0], "align.method=ahpa")
    assert main(["compare", str(ahpa), str(fewer)]) == 0
    assert "- ahpa-s0, ahpa-s1: evaluated otherwise (ahpa-s1: eval.num=100;" in capsys.readouterr().out
    apart = _evaluated(tmp_path, "ahpa-s2", [None, None, None, 6.0], "align.method=ahpa", "train.seed=2")
    assert main(["compare", str(ahpa), str(apart)]) == 0
    assert ("- ahpa-s0, ahpa-s2: no FD-r20 evaluation at images every seed was evaluated at (ahpa-s0: images 100-300, "
            "ahpa-s2: images 400-400)") in capsys.readouterr().out


def test_real_runs_of_two_seeds_are_grouped(tmp_path, tiny, capsys):
    """What the trainer writes (every setting, inputs.json, starts.jsonl) differs between two seeds in train.seed
    alone: they are one row."""
    from ahpa.train.loop import Trainer

    for seed in (0, 1):
        Trainer(tiny("train.steps=1", "align.method=none", f"train.seed={seed}"), tmp_path / f"none-s{seed}").run()
    assert main(["compare", str(tmp_path / "none-s0"), str(tmp_path / "none-s1")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# 2 runs; baseline none-s0 (2 seeds: 0, 1)\n") and "Settings that differ (" in text
    assert "- none-s0 (2 seeds: 0, 1): none-s0 (seed 0), none-s1 (seed 1)" in text and "- `" not in text


def test_a_paired_seed_whose_baseline_did_not_improve_is_not_counted_as_ahead(tmp_path, capsys):
    """Seed 1's baseline run rose from its first evaluation on, so no speed-up is read at seed 1 ("—"). The verdict
    said "ahead of the baseline at every paired seed" from seed 0 alone; it counts the seeds read and names the other."""
    none = _seeds(tmp_path, "none", [10.0, 8.0, 6.0], [6.0, 6.5, 7.0])  # the mean (8.0, 7.25, 6.5) improves
    ahpa = _seeds(tmp_path, "ahpa", [9.0, 7.0, 5.0], [5.5, 6.0, 6.5])
    assert main(["compare", *map(str, none + ahpa)]) == 0
    text = capsys.readouterr().out
    assert ("1.20x (seed 0), — (seed 1): ahead of the baseline at 1 of 1 paired seeds read; none is read at seed 1, "
            "whose baseline run did not improve after its first evaluation.") in text
    assert "every paired seed" not in text


def test_a_group_of_repa_seeds_keeps_what_its_flops_count(tmp_path):
    """A group's FLOPs per image are its seeds' mean only where every seed counted the same things: a REPA seed
    started before its encoder's forward was recorded makes the group's per-FLOP figure unknown, and the group is
    named as uncounted, as such a run alone is."""
    import json

    from ahpa import compare
    from ahpa.compare_seeds import group_seeds

    repa = _seeds(tmp_path, "repa", [9.0, 7.0, 5.0], [9.4, 7.4, 5.4],
                  s0=("prior.external=dinov2:w/dinov2",), s1=("prior.external=dinov2:w/dinov2",))
    (repa[0] / "starts.jsonl").write_text(json.dumps({"step": 0, "train_flops_per_image": 100.0,
                                                      "frozen_flops_per_image": 50.0}) + "\n")
    (repa[1] / "starts.jsonl").write_text(json.dumps({"step": 0, "train_flops_per_image": 100.0}) + "\n")
    rows, _ = group_seeds([compare.read_run(p) for p in repa])
    assert len(rows) == 1 and rows[0].flops_per_image is None and not rows[0].frozen_counted
    (repa[1] / "starts.jsonl").write_text(json.dumps({"step": 0, "train_flops_per_image": 100.0,
                                                      "frozen_flops_per_image": 70.0}) + "\n")
    rows, _ = group_seeds([compare.read_run(p) for p in repa])
    assert rows[0].flops_per_image == 160.0 and rows[0].frozen_counted
