"""The ratios benchmarks/throughput.py reports: each method's img/s over vanilla SiT's, measured side by side in the
same run, prefetch on over off, and post-hoc EMAs on over off. Read from its records, so any results file can be
read again."""

from __future__ import annotations


def blocks_name(ckpt: int) -> str:
    return "all" if ckpt == -1 else str(ckpt)


def sigmas_name(sigmas) -> str:
    """A train.posthoc_ema setting as --posthoc-ema gives it: 0.05:0.1."""
    return ":".join(f"{s:g}" for s in sigmas)


def ratios(records: list[dict]) -> dict:
    """img/s of each method over `none` of the same model, compile mode, activation checkpointing and post-hoc EMAs
    (measured side by side; a cached method against `none` with the same prefetch setting, others against `none` with
    prefetch on), of each cached method with prefetch on over off, and of each run tracking post-hoc EMAs over the
    same run without them (records from before --posthoc-ema count as without)."""
    train = [r for r in records if r.get("kind") == "train" and "img_per_s" in r]
    base = {(r["model"], r["compile"], r.get("activation_checkpointing", 0), r.get("prefetch"),
             tuple(r.get("posthoc_ema", ()))): r["img_per_s"] for r in train if r["method"] == "none"}
    out = {}
    for r in train:
        model, compiled, ckpt, prefetch = r["model"], r["compile"], r.get("activation_checkpointing", 0), r.get("prefetch")
        posthoc = tuple(r.get("posthoc_ema", ()))
        mode = ("compiled" if compiled else "eager") + (f", checkpointing {blocks_name(ckpt)}" if ckpt else "")
        share = f" (token_fraction {r['token_fraction']:g})" if r.get("token_fraction", 1) != 1 else ""
        tracked = f" (posthoc_ema {sigmas_name(posthoc)})" if posthoc else ""
        if r["method"] != "none":
            ref = base.get((model, compiled, ckpt, True if prefetch is None else prefetch, posthoc))
            if ref is None and prefetch is None:
                ref = base.get((model, compiled, ckpt, False, posthoc))
            if ref is not None:
                off = " (prefetch off)" if prefetch is False else ""
                out[f"{model} {mode} {r['method']}/none{share}{off}{tracked}"] = round(r["img_per_s"] / ref, 3)
        same = (model, compiled, ckpt, r["method"], r.get("token_fraction", 1))
        if prefetch is True:
            twin = next((o for o in train if o.get("prefetch") is False and tuple(o.get("posthoc_ema", ())) == posthoc
                         and (o["model"], o["compile"], o.get("activation_checkpointing", 0), o["method"],
                              o.get("token_fraction", 1)) == same), None)
            if twin is not None:
                out[f"{model} {mode} {r['method']}{share} prefetch on/off{tracked}"] = round(r["img_per_s"] / twin["img_per_s"], 3)
        if posthoc:
            twin = next((o for o in train if not o.get("posthoc_ema") and o.get("prefetch") == prefetch
                         and (o["model"], o["compile"], o.get("activation_checkpointing", 0), o["method"],
                              o.get("token_fraction", 1)) == same), None)
            if twin is not None:
                off = " (prefetch off)" if prefetch is False else ""
                out[f"{model} {mode} {r['method']}{share}{off} posthoc_ema {sigmas_name(posthoc)} on/off"] = round(
                    r["img_per_s"] / twin["img_per_s"], 3)
    return out
