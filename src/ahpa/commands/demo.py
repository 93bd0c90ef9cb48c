"""ahpa demo [--out DIR]: the whole pipeline on a laptop CPU, no downloads, with a measured check."""

from __future__ import annotations



def register(sub) -> None:
    p = sub.add_parser("demo", help="procedural data -> small VAE -> SiT with AHPA -> samples, router plot and a check")
    p.add_argument("--out", default="runs/demo", help="a new or empty directory, or one an earlier demo made (a rerun "
                   "there deletes that demo's outputs and starts afresh); default: runs/demo")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, VAE, judge and SiT (default 0)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the demo's SiT config")
    p.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm

    from ahpa.demo.pipeline import run_demo

    report = run_demo(args.out, progress=lambda desc, total: tqdm(total=total, desc=desc, dynamic_ncols=True),
                      sit_overrides=args.overrides, seed=args.seed)
    s = report["seconds"]
    print("\nstages (s): " + ", ".join(f"{k} {v}" for k, v in s.items()) + f"; total {sum(s.values()):.0f}")
    print(f"judge accuracy on real images {report['judge_accuracy_real']:.1%}, "
          f"on VAE reconstructions {report['judge_accuracy_vae_reconstructions']:.1%}")
    verdict = "PASS" if report["passed"] else "FAIL"
    print(f"check: {report['class_consistency']:.1%} of {report['num_samples']} samples are judged to be of their "
          f"conditioning class (chance {report['chance']:.1%}, target >= {report['target']:.0%}): {verdict}")
    for name, path in report["files"].items():
        print(f"  {name:8s} {path}")
    print(f"  report   {args.out}/report.json")
    return 0 if report["passed"] else 1
