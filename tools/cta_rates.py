"""What CTAugment learned (issue 35): the rates of every operation's bins at the end of each CTA run, which bins
it still draws, as a table and as the figure docs/cta_rates.png.

A bin's rate is a running average (decay 0.99) of how well the EMA model still classifies labeled images that
were augmented with a level from that bin (common.cta_update); the sampler draws only the bins whose rate + 0.01
is at least 0.80 of the best bin's of the same parameter (common.rate_to_p). So a bin that is not kept is a
magnitude that the model cannot yet undo. Which end of a parameter's bins is the mild one depends on the operation
(common.CTA_OPS): level 0 leaves the image as it is for the blends, cutout and rescale's crop, the middle does for
rotate, shear, translate, brightness, color, contrast and sharpness, and level 1 does for posterize and solarize.

The run folders do not last, so the final rates of every finished CTA run are kept in docs/cta_rates.json (one
entry per run, the same run replaced), and the figure can be drawn again from that file alone:

    python tools/cta_rates.py --runs ../exp/runs/cta     # add the finished CTA runs there, then draw
    python tools/cta_rates.py                            # from docs/cta_rates.json alone
(--json and --plot name other files.)
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # common.py and compare.py live in the repository root, one level up
import common  # noqa: E402
import compare  # noqa: E402
from label_sweep import merge  # noqa: E402  (tools/, this file's folder)

# One row per parameter: the operation, and which of its parameters (rescale has two: the crop and the filter).
PARAMETERS = [(name, j) for name in common.CTA_NAMES for j in range(len(common.CTA_OPS[name][1]))]


def parameter_label(name: str, j: int) -> str:
    return {("rescale", 0): "rescale (crop)", ("rescale", 1): "rescale (filter)"}.get((name, j), name)


def rows_from_runs(folder: str, source: str) -> list[dict]:
    """An entry for every finished run under `folder` that trained with CTAugment: its final rates, read from the
    checkpoint (which the run writes at its last step), rounded to 4 decimals."""
    finished, _ = compare.load_runs(folder)
    rows = []
    for r in finished:
        if r["args"].get("augment") != "ctaugment":
            continue
        ckpt = torch.load(os.path.join(r["folder"], "checkpoint.pt"), map_location="cpu", weights_only=False)
        if ckpt["step"] != r["args"]["epochs"] * r["args"]["steps_per_epoch"]:
            raise SystemExit(f"{r['folder']}: its checkpoint is from step {ckpt['step']}, not the last step")
        rows.append({"algorithm": r["algorithm"], "n_labeled": r["args"]["n_labeled"], "seed": r["args"]["seed"],
                     "source": source, "rates": [round(float(v), 4) for v in ckpt["cta_rates"]]})
    return rows


def per_parameter(rates: np.ndarray) -> list[np.ndarray]:
    """The flat rate vector [303] as one array per row of PARAMETERS, in that order."""
    t = torch.as_tensor(rates)
    return [common.cta_rates_of(t, name)[j].numpy() for name, j in PARAMETERS]


def kept(rates: np.ndarray) -> np.ndarray:
    """Which bins the sampler still draws, in the flat layout (rate_to_p > 0)."""
    return common.rate_to_p(np.asarray(rates, dtype=np.float64)) > 0


def seed_arrays(entries: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row of PARAMETERS, over a group's entries: the rates and the kept mask (1.0 or 0.0), a row per seed."""
    rates = [per_parameter(np.array(e["rates"])) for e in entries]
    masks = [per_parameter(kept(e["rates"]).astype(float)) for e in entries]
    return [(np.array([r[i] for r in rates]), np.array([m[i] for m in masks])) for i in range(len(PARAMETERS))]


def groups(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """The entries by (algorithm, number of labels), in the order of `rows`."""
    out = {}
    for r in rows:
        out.setdefault((r["algorithm"], r["n_labeled"]), []).append(r)
    return out


def markdown(rows: list[dict]) -> str:
    """Per parameter and group: the bins kept (a range of bin numbers 0..16, or a list), as many seeds agree;
    then the mean rate over all its bins. A bin counts as kept when it is kept in most of the group's seeds."""
    cells = groups(rows)
    header = [f"{a} {n}" for a, n in cells]
    lines = ["Bins CTAugment still draws at the end of the run (bin b holds the levels b/17 to (b+1)/17; a bin counts "
             "when most seeds keep it), then the parameter's mean rate over its bins and seeds.", "",
             "| parameter | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    arrays = [seed_arrays(entries) for entries in cells.values()]  # per group, per parameter
    for i, (name, j) in enumerate(PARAMETERS):
        texts = []
        for group in arrays:
            rates, masks = group[i]
            majority = np.flatnonzero(masks.mean(0) > 0.5)
            texts.append(f"{bin_ranges(majority, masks.shape[1])}; {rates.mean():.2f}")
        lines.append(f"| {parameter_label(name, j)} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def bin_ranges(bins: np.ndarray, n: int) -> str:
    """[0 1 2 5 6] -> '0-2, 5-6'; every bin -> 'all n'; none -> 'none'."""
    if len(bins) == n:
        return f"all {n}"
    if len(bins) == 0:
        return "none"
    parts, start = [], bins[0]
    for a, b in zip(bins, list(bins[1:]) + [None]):
        if b != a + 1:
            parts.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(parts)


def plot(rows: list[dict], path: str) -> None:
    """One panel per (algorithm, number of labels): parameters down, bins across, the colour the mean rate over
    the seeds; a cross marks a bin that no seed keeps, a dot one that some seeds keep and others not."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = groups(rows)
    fig, axes = plt.subplots(1, len(cells), figsize=(3.2 * len(cells) + 1.5, 6.5), sharey=True, squeeze=False)
    for ax, ((algorithm, n), entries) in zip(axes[0], cells.items()):
        rate = np.full((len(PARAMETERS), 17), np.nan)
        share = np.full((len(PARAMETERS), 17), np.nan)
        for i, (r, k) in enumerate(seed_arrays(entries)):
            rate[i, :r.shape[1]], share[i, :k.shape[1]] = r.mean(0), k.mean(0)
        image = ax.imshow(rate, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
        for marker, where in (("x", share == 0), (".", (share > 0) & (share < 1))):
            y, x = np.nonzero(where)
            ax.scatter(x, y, marker=marker, s=14, color="white", linewidths=0.8)
        ax.set_title(f"{algorithm}, {n} labels ({len(entries)} seed{'s' * (len(entries) > 1)})", fontsize=9)
        ax.set_xticks([0, 8, 16])
        ax.set_xlabel("bin (level 0 to 1)", fontsize=8)
    axes[0][0].set_yticks(range(len(PARAMETERS)), [parameter_label(*p) for p in PARAMETERS], fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.02, label="rate (mean over seeds)")
    fig.suptitle("CTAugment's rates at the end of training; x: no seed draws the bin, .: some seeds do", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=None, help="a folder of finished runs to add (compare.py's --out); runs "
                   "without --augment ctaugment are skipped")
    p.add_argument("--source", default="", help="what the entries added from --runs say of where they ran")
    p.add_argument("--json", default=os.path.join(REPO, "docs", "cta_rates.json"), help="one entry per run")
    p.add_argument("--plot", default=os.path.join(REPO, "docs", "cta_rates.png"), help="the figure (PNG)")
    args = p.parse_args()
    rows = []
    if os.path.exists(args.json):
        with open(args.json) as f:
            rows = json.load(f)
    if args.runs:
        rows = merge(rows, rows_from_runs(args.runs, args.source), ("algorithm", "n_labeled", "seed"))
        with open(args.json, "w") as f:
            f.write("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")  # a line per run: short diffs
    if not rows:
        raise SystemExit(f"no CTA runs in {args.json}" + (f" or {args.runs}" if args.runs else ""))
    print(markdown(rows))
    plot(rows, args.plot)
    print(f"\n{len(rows)} runs ({args.json}); plot: {args.plot}")


if __name__ == "__main__":
    main()
