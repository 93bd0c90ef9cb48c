"""Several seeds of one method read as one (`ahpa compare`): runs that differ only in `train.seed`, and were
evaluated alike, form a group whose curves are the mean of its seeds' at the images every seed was evaluated at.
Speed-ups are read between mean curves, and also seed by seed where a group and the baseline have the same seeds
(runs of one seed share their initial weights, batches and noise, so a paired difference carries less of the
seed-to-seed spread), so that a reader sees whether a gain exceeds the spread between seeds.

Pure functions over `ahpa.compare.Run`s; a group is a Run whose `seeds` are the runs it is the mean of.
"""

from __future__ import annotations

import statistics

from ahpa.compare import SPEED_SHOWN, Run, differing_settings, digits, speed_kind, speed_up, value_at
from ahpa.train import eval_setup


def seed_of(run: Run):
    return run.settings.get("train.seed", 0)


def group_seeds(runs: list[Run], enabled: bool = True) -> tuple[list[Run], list[str]]:
    """(the rows to compare: each group of seeds in place of its first run, the other runs as given; a line for each
    set of runs of other seeds that differ in nothing else but were not grouped, saying why). Runs whose compared
    settings differ only in train.seed (ahpa.compare.differing_settings: not the run length, nor what a run did not
    read; data and VAE by content) are seeds of one method; copies of one seed are not other seeds, and stay apart."""
    sets: list[list[Run]] = []  # runs alike but for their seed, in the order given
    for r in runs:
        home = next((s for s in sets if set(differing_settings([*s, r])) <= {"train.seed"}), None)
        if home is None:
            sets.append([r])
        else:
            home.append(r)
    groups, notes = {}, []  # the first run of each group -> the group
    for members in sets:
        if len({seed_of(r) for r in members}) < 2:
            continue  # one run, or copies of one seed (a rerun): nothing to group
        why = "grouping of seeds is switched off (--no-group-seeds)" if not enabled else not_groupable(members)
        if why:
            notes.append(f"- {', '.join(r.name for r in members)}: {why}")
        else:
            groups[members[0].name] = mean_of(members)
    grouped = {r.name for g in groups.values() for r in g.seeds}
    return [groups.get(r.name, r) for r in runs if r.name in groups or r.name not in grouped], notes


def not_groupable(members: list[Run]) -> str:
    """Why runs alike but for their seed are not one method measured with several seeds ("" when they are): a seed
    given twice, evaluations made otherwise, or no evaluation point every seed has."""
    seen: dict = {}  # seed -> its first run
    for r in members:
        first = seen.setdefault(seed_of(r), r)
        if first is not r:
            return (f"seed {seed_of(r)} is given twice ({first.name}, {r.name}): a rerun or a copy is no other seed; "
                    "give one run per seed")
    for r in members[1:]:
        if r.eval_setup != members[0].eval_setup:
            changed = eval_setup.changed(r.eval_setup or "", members[0].eval_setup or "") or "no recorded setup"
            return f"evaluated otherwise ({r.name}: {changed}; {members[0].name}: {members[0].eval_setup or 'unrecorded'})"
    for metric in dict.fromkeys(m for r in members for m in r.evals):
        if not mean_curve([r.evals.get(metric, []) for r in members])[0]:
            spans = ", ".join(f"{r.name}: {span(r.evals.get(metric, []))}" for r in members)
            return f"no {metric} evaluation at images every seed was evaluated at ({spans})"
    return ""


def values(xs: list[float]) -> str:
    """One value, or the range of several (min-max), with decimals enough to tell them apart."""
    d = digits(xs)
    return f"{xs[0]:.{d}f}" if len(xs) == 1 else f"{min(xs):.{d}f}-{max(xs):.{d}f}"


def span(curve: list[tuple[int, float]]) -> str:
    return f"images {curve[0][0]:,}-{curve[-1][0]:,}" if curve else "none"


def mean_curve(curves: list[list[tuple[int, float]]]) -> tuple[list[tuple[int, float]], list[list[int]]]:
    """(the mean of the curves at the images every one of them has, ascending; the images of each curve left out)."""
    by = [dict(c) for c in curves]  # images -> value; a point logged twice: its last value
    common = sorted(set.intersection(*(set(b) for b in by))) if by else []
    return ([(x, statistics.mean(b[x] for b in by)) for x in common],
            [sorted(set(b) - set(common)) for b in by])


def mean_of(members: list[Run]) -> Run:
    """A group of seeds as one Run: named after its lowest seed's run with its seeds ("none-s0 (2 seeds: 0, 1)");
    each curve the mean of its seeds'; its img/s windows all of theirs; its settings theirs, train.seed the list."""
    members = sorted(members, key=seed_of)
    seeds, first = [seed_of(r) for r in members], members[0]
    flops, counted = [r.flops_per_image for r in members], {r.frozen_counted for r in members}
    # seeds recorded with and without REPA's encoder FLOPs (a seed started before they were) have no common figure
    return Run(f"{first.name} ({len(seeds)} seeds: {', '.join(map(str, seeds))})", first.path,
               {**first.settings, "train.seed": seeds},
               evals={m: mean_curve([r.evals[m] for r in members])[0] for m in first.evals},
               flow=mean_curve([r.flow for r in members])[0], rates=[x for r in members for x in r.rates],
               done=all(r.done for r in members), env=first.env, eval_setups=first.eval_setups,
               identities=first.identities, steps={x: n for r in reversed(members) for x, n in r.steps.items()},
               flops_per_image=statistics.mean(flops) if all(flops) and len(counted) == 1 else None,
               frozen_counted=all(counted), seeds=members)


def seed_curves(row: Run, metric: str) -> dict:
    """{seed: its curve of `metric`}: a group's seeds at the points of its mean only (the points the mean and its
    speed-up are read at), a run alone its own curve."""
    if not row.seeds:
        return {seed_of(row): row.evals.get(metric, [])}
    points = {x for x, _ in row.evals.get(metric, [])}
    return {seed_of(r): [(x, y) for x, y in dict(r.evals.get(metric, [])).items() if x in points] for r in row.seeds}


def describe(rows: list[Run], metric: str) -> list[str]:
    """A line per group: the runs it holds, and with `metric` its mean and the spread of its seeds at its last
    common point, and the evaluations left out of the mean (a seed evaluated at images another was not)."""
    lines = []
    for g in (r for r in rows if r.seeds):
        line = f"- {g.name}: " + ", ".join(f"{r.name} (seed {seed_of(r)})" for r in g.seeds)
        curve = g.evals.get(metric, [])
        if curve:
            last = [c[-1][1] for c in seed_curves(g, metric).values()]
            line += (f"; {metric} at {curve[-1][0]:,} images (the last every seed was evaluated at): mean "
                     f"{curve[-1][1]:.{digits(last)}f}, seeds {values(last)} (n={len(last)})")
            left = mean_curve([r.evals[metric] for r in g.seeds])[1]
            out = [f"{r.name} at {', '.join(f'{i:,}' for i in images)}" for r, images in zip(g.seeds, left) if images]
            if out:
                line += f"; left out of the mean, as not every seed was evaluated there: {'; '.join(out)} images"
        lines.append(line)
    return lines


def paired(rows: list[Run], baseline: Run, metric: str, otherwise: dict[str, str]) -> list[str]:
    """For each row other than the baseline, where it or the baseline is a group of seeds: the speed-up between
    their mean curves, the speed-up of each seed over the baseline's run of that seed (each read at the points of
    its group's mean), and in words whether it is ahead at every paired seed and whether the two sets of seeds'
    values at the baseline's last images overlap (a difference within the seed spread) or not. `otherwise`: rows
    evaluated otherwise than the baseline (ahpa.compare.evaluated_otherwise), of which nothing is read."""
    lines = []
    for row in rows:
        if row is baseline or not (row.seeds or baseline.seeds) or not row.evals.get(metric):
            continue
        if row.name in otherwise:
            lines.append(f"- {row.name}: evaluated otherwise than the baseline; nothing is read")
            continue
        pairs = {s: (ratio, SPEED_SHOWN[kind].format(ratio))
                 for s, (ratio, kind) in paired_speed_ups(row, baseline, metric).items()}
        means = ("the mean curves" if row.seeds and baseline.seeds else
                 "its mean curve and the baseline" if row.seeds else "it and the baseline's mean curve")
        line = f"- {row.name}: {speed_up(baseline.evals.get(metric, []), row.evals[metric])[1]} between {means}"
        if pairs:
            line += "; " + ", ".join(f"{text} (seed {s})" for s, (_, text) in pairs.items()) + ": " + ahead(pairs)
        else:
            line += "; no seed in common with the baseline, so none is paired (train the baseline's seeds to pair them)"
        lines.append(line + spread(row, baseline, metric))
    return lines


def paired_speed_ups(row: Run, baseline: Run, metric: str) -> dict:
    """{seed: (ratio, kind) of ahpa.compare.speed_kind} of each seed of `row` over the baseline's run of that seed,
    each read at the points of its group's mean (seed_curves); {} where they share no seed."""
    base, mine = seed_curves(baseline, metric), seed_curves(row, metric)
    return {s: speed_kind(base[s], mine[s]) for s in mine if s in base}


def ahead(pairs: dict) -> str:
    """Whether the speed-ups of the paired seeds (ahpa.compare.speed_up's) are all above 1.00x, in words. A seed whose
    baseline run did not improve after its first evaluation gives none ("—"): the verdict counts the seeds read and
    names the others, as "every paired seed" over one seed read of two would claim what was not measured."""
    read = [ratio for ratio, text in pairs.values() if text != "—"]
    if not read:
        return "no speed-up is read at any paired seed"
    k = sum(ratio is not None and ratio > 1 for ratio in read)
    unread = [str(s) for s, (_, text) in pairs.items() if text == "—"]
    if unread:  # only a group's baseline has several seeds, and each of its seeds' curves has the group's points
        return (f"ahead of the baseline at {k} of {len(read)} paired seeds read; "
                f"none is read at seed{'s' if len(unread) > 1 else ''} {', '.join(unread)}, whose baseline run did not "
                "improve after its first evaluation")
    return ("ahead of the baseline at every paired seed" if k == len(read) else
            "ahead of the baseline at no paired seed" if k == 0 else f"ahead of the baseline at {k} of {len(read)} paired seeds")


def spread(row: Run, baseline: Run, metric: str) -> str:
    """Whether a row's seeds and the baseline's, at the baseline's last common images, overlap in `metric`."""
    base = baseline.evals.get(metric, [])
    if not base:
        return ""
    x = base[-1][0]
    theirs = [c[-1][1] for c in seed_curves(baseline, metric).values()]
    mine = [value_at(c, x) for c in seed_curves(row, metric).values()]
    if any(v is None for v in mine):
        return f". Not evaluated at the baseline's last {x:,} images: no spread compared"
    whose = "its seeds'" if row.seeds else "its"
    shown = (f". At {x:,} images {whose} {metric} {values(mine)}, the baseline's "
             f"{'seeds ' if baseline.seeds else ''}{values(theirs)}")
    if max(mine) < min(theirs) or min(mine) > max(theirs):
        return f"{shown}: all {'below' if max(mine) < min(theirs) else 'above'} the baseline's, beyond the seed spread"
    return f"{shown}: the ranges overlap, within the seed spread"
