"""The ratios benchmarks/throughput.py reports: each method's img/s over vanilla SiT's, measured side by side in the
same run, and prefetch on over off. Read from its records, so any results file can be read again."""

from __future__ import annotations


def blocks_name(ckpt: int) -> str:
    return "all" if ckpt == -1 else str(ckpt)


def ratios(records: list[dict]) -> dict:
    """img/s of each method over `none` of the same model, compile mode and activation checkpointing (measured side
    by side; a cached method against `none` with the same prefetch setting, others against `none` with prefetch on),
    and of each cached method with prefetch on over off."""
    train = [r for r in records if r.get("kind") == "train" and "img_per_s" in r]
    base = {(r["model"], r["compile"], r.get("activation_checkpointing", 0), r.get("prefetch")): r["img_per_s"]
            for r in train if r["method"] == "none"}
    out = {}
    for r in train:
        model, compiled, ckpt, prefetch = r["model"], r["compile"], r.get("activation_checkpointing", 0), r.get("prefetch")
        mode = ("compiled" if compiled else "eager") + (f", checkpointing {blocks_name(ckpt)}" if ckpt else "")
        share = f" (token_fraction {r['token_fraction']:g})" if r.get("token_fraction", 1) != 1 else ""
        if r["method"] != "none":
            ref = base.get((model, compiled, ckpt, True if prefetch is None else prefetch))
            if ref is None and prefetch is None:
                ref = base.get((model, compiled, ckpt, False))
            if ref is not None:
                off = " (prefetch off)" if prefetch is False else ""
                out[f"{model} {mode} {r['method']}/none{share}{off}"] = round(r["img_per_s"] / ref, 3)
        if prefetch is True:
            twin = next((o for o in train if o["method"] == r["method"] and o.get("prefetch") is False
                         and o.get("token_fraction", 1) == r.get("token_fraction", 1)
                         and (o["model"], o["compile"], o.get("activation_checkpointing", 0)) == (model, compiled, ckpt)), None)
            if twin is not None:
                out[f"{model} {mode} {r['method']}{share} prefetch on/off"] = round(r["img_per_s"] / twin["img_per_s"], 3)
    return out
