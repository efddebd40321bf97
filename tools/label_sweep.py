"""Accuracy against the number of labels over all four label counts of the CPU protocol (issue 24): the table
(mean ± std over seeds, each seed), the paired differences and docs/cpu_accuracy_vs_labels.png.

The 250- and 1000-label runs (commit 24373ec, 2-core Intel VM, 2026-11) are kept only as their final EMA top-1
per seed, the figures of docs/results.md, which are the rows of docs/cpu_runs.csv; their run folders are gone.
The 40- and 4000-label runs are read from their run folders and added to the CSV (a row per finished run, the
same run replaced), so that the figure can be drawn again from the CSV alone:

    python tools/label_sweep.py --runs ../exp/runs/cpu3     # add the finished runs there, then draw
    python tools/label_sweep.py                             # from docs/cpu_runs.csv alone
(--csv and --plot name other files.)

The CSV's augment column says which strong augmentation a run used (issue 35): randaugment or ctaugment for the
scripts that have --augment, empty for those that do not (supervised, mixmatch). A CTAugment run is its own row of
the tables, "<algorithm>-cta", and is compared with its RandAugment row seed by seed.
"""

import argparse
import csv
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # compare.py lives in the repository root, one level up
import compare  # noqa: E402

FIELDS = ["algorithm", "augment", "n_labeled", "seed", "final_top1", "final_top5", "source"]


def read_csv(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [{**row, "augment": row.get("augment") or "", "n_labeled": int(row["n_labeled"]),
                 "seed": int(row["seed"])} for row in csv.DictReader(f)]


def rows_from_runs(folder: str, source: str) -> list[dict]:
    """A CSV row for every finished run under `folder` (compare.py's reading of run folders)."""
    finished, _ = compare.load_runs(folder)
    # A run from before --augment existed used RandAugment (the scripts' PREDATING table says the same).
    default = {a: "randaugment" if "--augment" in compare.script_flags(a) else ""
               for a in {r["algorithm"] for r in finished}}
    return [{"algorithm": r["algorithm"], "augment": r["args"].get("augment", default[r["algorithm"]]),
             "n_labeled": r["args"]["n_labeled"], "seed": r["args"]["seed"],
             "final_top1": f"{r['results']['final_top1']:.4f}", "final_top5": f"{r['results']['final_top5']:.4f}",
             "source": source} for r in finished]


def merge(rows: list[dict], new: list[dict],
          fields: tuple = ("algorithm", "augment", "n_labeled", "seed")) -> list[dict]:
    """rows with new ones added; a new row replaces the row with the same values of `fields` (also
    tools/cta_rates.py's entries, which have no augment column)."""
    merged = {tuple(r[k] for k in fields): r for r in rows} | {tuple(r[k] for k in fields): r for r in new}
    order = {a: i for i, a in enumerate(compare.ALGORITHMS)}
    return sorted(merged.values(), key=lambda r: (order.get(r["algorithm"], 99), r.get("augment") == "ctaugment",
                                                   r["n_labeled"], r["seed"]))


def as_runs(rows: list[dict]) -> list[dict]:
    """The CSV rows in the shape compare.py aggregates: algorithm (with -cta for a CTAugment run), args
    (n_labeled, seed), results."""
    return [{"algorithm": r["algorithm"] + ("-cta" if r["augment"] == "ctaugment" else ""),
             "args": {"n_labeled": r["n_labeled"], "seed": r["seed"]},
             "results": {"final_top1": float(r["final_top1"])}} for r in rows]


def markdown(runs: list[dict]) -> str:
    groups = compare.group_runs(runs)
    columns = sorted({n for cells in groups.values() for n in cells})
    lines = ["EMA top-1 (%) at the final evaluation: mean ± sample std over seeds (number of seeds), then each seed "
             "(0, 1, 2).", "", *compare.table_header(columns)]
    for label, cells in groups.items():
        texts = []
        for n in columns:
            by_seed = sorted((r["args"]["seed"], 100 * r["results"]["final_top1"]) for r in cells.get(n, []))
            texts.append(f"{compare.cell(cells[n], 'final_top1')}: " + ", ".join(f"{v:.2f}" for _, v in by_seed)
                         if by_seed else "")
        lines.append(f"| {label} | " + " | ".join(texts) + " |")
    lines += ["", *compare.paired_differences(groups, "supervised")]
    # The FixMatch family against FixMatch, and its three successors against FlexMatch (issue 34).
    family = {k: v for k, v in groups.items() if k in ("fixmatch", "flexmatch", "freematch", "softmatch")}
    lines += compare.paired_differences(family, "fixmatch")
    if "flexmatch" in family and len(family) > 2:
        lines += compare.paired_differences({k: v for k, v in family.items() if k != "fixmatch"}, "flexmatch")
    for label in groups:  # CTAugment against RandAugment, algorithm by algorithm (issue 35)
        if label.endswith("-cta") and label[:-4] in groups:
            lines += compare.paired_differences({label[:-4]: groups[label[:-4]], label: groups[label]}, label[:-4])
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=None, help="a folder of finished runs to add to the CSV (compare.py's --out)")
    p.add_argument("--source", default="commit 3124230, 2-core AMD EPYC VM, 2026-12",
                   help="what the CSV's source column says of the runs added from --runs")
    p.add_argument("--csv", default=os.path.join(REPO, "docs", "cpu_runs.csv"), help="one row per run")
    p.add_argument("--plot", default=os.path.join(REPO, "docs", "cpu_accuracy_vs_labels.png"),
                   help="the figure (PNG): top-1 against the number of labels, log x-axis, std over seeds as bars")
    args = p.parse_args()
    rows = read_csv(args.csv)
    if args.runs:
        rows = merge(rows, rows_from_runs(args.runs, args.source))
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    runs = as_runs(rows)
    print(markdown(runs))
    compare.plot_accuracy_vs_labels(runs, args.plot, panels=(("final_top1", "final evaluation"),))
    print(f"\n{len(rows)} runs ({args.csv}); plot: {args.plot}")


if __name__ == "__main__":
    main()
