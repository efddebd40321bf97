"""Run and report a comparison grid: algorithms x number of labels x seeds x any swept flag.

    python compare.py --algorithms fixmatch flexmatch freematch softmatch mixmatch remixmatch supervised \\
        --n-labeled 40 250 4000 --seeds 0 1 2 [--sweep batch-size=32,64,128] [-- any other script flags]

Every run is a subprocess of the real script with its own folder under --out, named after its grid point
(e.g. runs/fixmatch_n250_seed1_batch-size32), so rerunning the same command skips finished runs and resumes
interrupted ones (the scripts resume from their checkpoint). One run per GPU at a time (--gpus 0,1,...;
--per-gpu N for N at once), or on the CPU when no GPU is visible (--jobs N for N at once, each with its
share of the cores). A failing run is reported with its log and does not stop the others.
Flags after `--` go to every script that accepts them (`--mu 3` reaches the four FixMatch-family scripts only).

    --dry-run   print the commands and stop
    --slurm     write <out>/grid.sbatch, a SLURM array job with one task per run (same commands, resumable;
                requeued at the time limit; docs/cluster.md)
    --report    only aggregate: every results.json under --out -> <out>/results.md, accuracy_vs_labels.png,
                curves.png, and <run folder>/metrics.md, each run's table of epoch, train loss, test top-1 and
                top-5 (also done at the end of a grid)

In the report, top-1 is the EMA model's test accuracy: at the final evaluation, the median of the last 20
evaluations (the papers' convention) and the best evaluation, as mean +- std over seeds (sample std,
n = number of seeds); and, when the grid has a supervised row (or --baseline's), each row's final top-1 minus
the baseline's, seed by seed (a seed fixes the labeled split, so a pair shares its labeled images).
Runs whose arguments differ in anything but the seed are never averaged together: they get their own row,
labelled with the arguments that differ.
"""

import argparse
import itertools
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading

ALGORITHMS = ["supervised", "mixmatch", "remixmatch", "fixmatch", "flexmatch", "freematch", "softmatch"]
ROOT = os.path.dirname(os.path.abspath(__file__))
# Arguments that do not change a run's result, or that define the grid's axes (not its rows).
NOT_A_SETTING = {"algorithm", "out", "overwrite", "log_every", "compile", "cuda_graph", "data_dir", "device", "seed",
                 "n_labeled"}


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------------
def parse_sweep(specs: list[str]) -> dict[str, list[str]]:
    """['batch-size=32,64', 'lr=0.03,0.1'] -> {'batch-size': ['32', '64'], 'lr': ['0.03', '0.1']}."""
    sweep = {}
    for spec in specs:
        m = re.fullmatch(r"([a-z][a-z0-9-]*)=([^,=\s]+(?:,[^,=\s]+)*)", spec)
        if not m:
            raise UsageError(f"--sweep takes FLAG=V1,V2,... (e.g. batch-size=32,64), got {spec!r}")
        if m[1] in ("n-labeled", "seed", "out"):
            raise UsageError(f"--sweep {m[1]}: use --n-labeled / --seeds for the grid's own axes")
        if m[1] in sweep:  # a second --sweep of one flag would silently replace the first
            raise UsageError(f"--sweep {m[1]} is given twice; list all its values once: {m[1]}=V1,V2,...")
        sweep[m[1]] = list(dict.fromkeys(m[2].split(",")))
    return sweep


def run_name(algorithm: str, n_labeled: int, seed: int, swept: dict[str, str]) -> str:
    return "_".join([f"{algorithm}_n{n_labeled}_seed{seed}"] + [f"{k}{v}" for k, v in swept.items()])


def expand_grid(algorithms: list[str], n_labeled: list[int], seeds: list[int], sweep: dict[str, list[str]],
                extra: dict[str, list[str]], out: str) -> list[dict]:
    """One dict per run: name, folder and the command that runs (or resumes) it. A grid point given twice
    (--seeds 0 0) is one run: two processes must never train in the same folder."""
    runs = []
    algorithms, n_labeled, seeds = (list(dict.fromkeys(axis)) for axis in (algorithms, n_labeled, seeds))
    points = itertools.product(algorithms, n_labeled, seeds, itertools.product(*sweep.values()))
    for algorithm, n, seed, values in points:
        swept = dict(zip(sweep, values))
        name = run_name(algorithm, n, seed, swept)
        folder = os.path.join(out, name)
        cmd = [sys.executable, os.path.relpath(os.path.join(ROOT, f"{algorithm}.py")),
               "--n-labeled", str(n), "--seed", str(seed),
               "--out", folder, *[a for k, v in swept.items() for a in (f"--{k}", v)], *extra[algorithm]]
        runs.append({"name": name, "algorithm": algorithm, "folder": folder, "cmd": cmd})
    return runs


def script_flags(algorithm: str) -> set[str]:
    """The long flags a script accepts, read from its add_argument calls (no import: torch loads slowly)."""
    with open(os.path.join(ROOT, f"{algorithm}.py")) as f:
        calls = re.findall(r'add_argument\("(--[a-z][a-z0-9-]*)"(.*)', f.read())
    negated = {"--no-" + flag[2:] for flag, rest in calls if "BooleanOptionalAction" in rest}
    return {flag for flag, rest in calls} | negated


def route_extra(algorithms: list[str], extra: list[str], sweep: dict[str, list[str]]) -> dict[str, list[str]]:
    """Split the flags after `--` into FLAG [VALUE] groups and give each script the ones it accepts."""
    groups = []
    for token in extra:
        if token.startswith("--"):
            groups.append([token])
        elif groups:
            groups[-1].append(token)
        else:
            raise UsageError(f"unexpected {token!r} after --: script flags start with --")
    accepted = {a: script_flags(a) for a in algorithms}
    for flag in [g[0].split("=")[0] for g in groups] + [f"--{k}" for k in sweep]:
        if flag in ("--n-labeled", "--seed", "--out"):
            raise UsageError(f"{flag} is set by compare.py itself (use --n-labeled / --seeds / --out)")
        if not any(flag in accepted[a] for a in algorithms):
            raise UsageError(f"no selected script accepts {flag}")
    given = [g[0].split("=")[0] for g in groups]
    for k in sweep:  # the flag after -- would win over the swept value in a folder named after the latter
        if f"--{k}" in given or f"--no-{k}" in given:
            raise UsageError(f"--{k} is both swept (--sweep {k}=...) and given after --; give it once")
    for k in sweep:
        missing = [a for a in algorithms if f"--{k}" not in accepted[a]]
        if missing:
            raise UsageError(f"--sweep {k}: {', '.join(missing)} has no --{k}")
    return {a: [t for g in groups if g[0].split("=")[0] in accepted[a] for t in g] for a in algorithms}


def is_finished(run: dict) -> bool:
    """Finished, or diverged (rerunning would diverge again): either way not run again."""
    return any(os.path.exists(os.path.join(run["folder"], f)) for f in ("results.json", "diverged.json"))


def worker_envs(gpus: list[str], per_gpu: int = 1, jobs: int = 1) -> list[dict[str, str]]:
    """One environment per worker, each running one run at a time: `per_gpu` workers on each GPU, or, with no
    GPU, `jobs` workers on the CPU. CPU workers split the cores between them (OMP_NUM_THREADS = cores / jobs)
    unless the user set OMP_NUM_THREADS: two runs of two threads on two cores make every small op wait."""
    if gpus:
        return [{"CUDA_VISIBLE_DEVICES": gpu} for gpu in gpus for _ in range(per_gpu)]
    if jobs == 1 or "OMP_NUM_THREADS" in os.environ:
        return [{} for _ in range(jobs)]
    return [{"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))} for _ in range(jobs)]


def describe(workers: list[dict[str, str]]) -> str:
    """'GPU 0,1 (2 per GPU)', 'the CPU (2 at a time, 1 thread each)' or 'the CPU'."""
    gpus = list(dict.fromkeys(w["CUDA_VISIBLE_DEVICES"] for w in workers if "CUDA_VISIBLE_DEVICES" in w))
    if gpus:
        return f"GPU {','.join(gpus)}" + (f" ({len(workers) // len(gpus)} per GPU)" if len(workers) > len(gpus) else "")
    threads = workers[0].get("OMP_NUM_THREADS")
    at_once = f" ({len(workers)} at a time{f', {threads} threads each' if threads else ''})"
    return "the CPU" + (at_once if len(workers) > 1 else "")


def run_grid(runs: list[dict], workers: list[dict[str, str]]) -> list[dict]:
    """Run every unfinished run, one at a time per worker (worker_envs: its environment); return the failed
    ones."""
    pending = [r for r in runs if not is_finished(r)]
    print(f"{len(runs)} runs, {len(runs) - len(pending)} finished, {len(pending)} to run on {describe(workers)}",
          flush=True)
    failed, lock = [], threading.Lock()

    def worker(env_extra: dict[str, str]) -> None:
        gpu = env_extra.get("CUDA_VISIBLE_DEVICES")
        while True:
            with lock:
                if not pending:
                    return
                run = pending.pop(0)
            log = run["folder"] + ".log"
            os.makedirs(os.path.dirname(log) or ".", exist_ok=True)
            print(f"start {run['name']}{' on GPU ' + gpu if gpu is not None else ''} (log {log})", flush=True)
            with open(log, "a") as f:
                rc = subprocess.run(run["cmd"], stdout=f, stderr=subprocess.STDOUT,
                                    env={**os.environ, **env_extra}).returncode
            with lock:
                if rc != 0:
                    failed.append(run)
                status = {0: "done", 3: "DIVERGED (exit 3)", EXIT_PREEMPTED: "STOPPED by a signal (exit 75; rerun "
                          "to resume)"}.get(rc, f"FAILED (exit {rc})")
                print(f"{status} {run['name']}"
                      f"{'' if rc == 0 else f'; see {log}'}", flush=True)

    threads = [threading.Thread(target=worker, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failed


EXIT_PREEMPTED = 75  # the scripts' status for "stopped by SIGTERM or SIGUSR1 with a checkpoint of that step"
# The end of grid.sbatch, after RUNS=(...).
RUN_AND_REQUEUE = f"""# The run goes in the background so that this shell can pass signals on: bash runs a trap
# only between commands, and a trapped signal ends `wait` at once.
signalled=
trap 'signalled=USR1; kill -USR1 $pid 2>/dev/null' USR1
trap 'signalled=TERM; kill -TERM $pid 2>/dev/null' TERM
eval "exec ${{RUNS[$SLURM_ARRAY_TASK_ID]}}" &
pid=$!
wait $pid
while kill -0 $pid 2>/dev/null; do wait $pid; done  # a trap ended the wait: wait again
wait $pid; status=$?  # the run's exit status (bash keeps it)
# SIGUSR1 came (the time limit is near) and the run stopped short of the end: its checkpoint, or the one before
# (a signal during start-up), is where it resumes once requeued. Not after SIGTERM alone: scancel sends that too,
# and a cancelled task must stay cancelled (SLURM itself requeues a task preempted with PreemptMode=REQUEUE).
if [ "$signalled" = USR1 ] && {{ [ $status -eq {EXIT_PREEMPTED} ] || [ $status -gt 128 ]; }}; then
  echo "requeueing task $SLURM_ARRAY_TASK_ID (exit status $status): it resumes from its checkpoint"
  scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
fi
exit $status
"""


def slurm_script(runs: list[dict], out: str) -> str:
    """A SLURM array job with one task per run, which finishes by itself across time limits and preemptions: two
    minutes before a task's time limit SLURM sends SIGUSR1 to the batch shell, which passes it to the script; the
    script checkpoints the step it is in and exits 75, and the shell requeues the task, which resumes from that
    checkpoint. On preemption the script gets SIGTERM and does the same; SLURM requeues the task itself (--requeue)
    where the cluster preempts by requeueing. A grid whose every run has --device cpu asks for no GPU."""
    cpu_only = all(any(a == "--device=cpu" or a == "--device" and b == "cpu" for a, b in zip(r["cmd"], r["cmd"][1:]))
                   for r in runs)
    lines = ["#!/bin/bash", "#SBATCH --job-name=ssl-grid", f"#SBATCH --array=0-{len(runs) - 1}",
             *([] if cpu_only else ["#SBATCH --gres=gpu:1"]), "#SBATCH --cpus-per-task=8",
             f"#SBATCH --output={os.path.join(out, 'slurm-%A_%a.log')}",
             "# A requeued task adds to its log; SLURM may requeue a preempted task; SIGUSR1 to this shell two",
             "# minutes before the time limit.",
             "#SBATCH --open-mode=append", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120",
             "# One task per run. The script checkpoints the step it is in and exits with status 75 on SIGUSR1 or",
             "# SIGTERM; after SIGUSR1 (the time limit is near) this shell requeues the task, which then resumes from",
             "# its checkpoint. Finished runs exit at once. See docs/cluster.md.",
             f"cd {shlex.quote(os.getcwd())}", "RUNS=("]
    lines += [f"  {shlex.quote(shlex.join(['python', *r['cmd'][1:]]))}" for r in runs]
    return "\n".join(lines + [")"]) + "\n" + RUN_AND_REQUEUE


# ----------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------
def read_jsonl(path: str) -> list[dict]:
    """The complete lines of a metrics.jsonl (a half-written last line, from a crash, is skipped)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def load_runs(out: str) -> tuple[list[dict], list[dict]]:
    """(finished runs, unfinished runs) under `out`: every folder with an args.json. An unfinished run that
    stopped on a non-finite loss carries run["diverged"] (its diverged.json)."""
    finished, unfinished = [], []
    for dirpath, _, files in sorted(os.walk(out)):
        if "args.json" not in files:
            continue
        with open(os.path.join(dirpath, "args.json")) as f:
            args = json.load(f)
        metrics_path = os.path.join(dirpath, "metrics.jsonl")
        metrics = []
        if os.path.exists(metrics_path):
            metrics = read_jsonl(metrics_path)
        run = {"folder": dirpath, "args": args, "metrics": metrics}
        if "results.json" in files:
            with open(os.path.join(dirpath, "results.json")) as f:
                run["results"] = json.load(f)
            run["algorithm"] = run["results"]["algorithm"]
            finished.append(run)
        else:
            run["algorithm"] = args.get("algorithm", os.path.basename(dirpath).split("_")[0])
            if "diverged.json" in files:
                with open(os.path.join(dirpath, "diverged.json")) as f:
                    run["diverged"] = json.load(f)
            unfinished.append(run)
    return finished, unfinished


def mean_std(values: list[float]) -> str:
    """'85.31 +- 0.42 (3)' in percent; the std is the sample std over seeds, absent for one seed."""
    m = 100 * statistics.mean(values)
    if len(values) == 1:
        return f"{m:.2f} (1)"
    return f"{m:.2f} ± {100 * statistics.stdev(values):.2f} ({len(values)})"


def group_runs(runs: list[dict]) -> dict[str, dict[int, list[dict]]]:
    """Rows: the algorithm, plus the arguments that differ among that algorithm's runs (never averaged
    together); columns: n_labeled; cells: the runs (one per seed)."""
    rows = {}
    by_algorithm = {}
    for r in runs:
        by_algorithm.setdefault(r["algorithm"], []).append(r)
    for algorithm in sorted(by_algorithm, key=lambda a: (ALGORITHMS.index(a) if a in ALGORITHMS else 99, a)):
        group = by_algorithm[algorithm]
        keys = sorted({k for r in group for k in r["args"]} - NOT_A_SETTING)
        varying = [k for k in keys if len({json.dumps(r["args"].get(k)) for r in group}) > 1]
        for r in group:
            label = algorithm + "".join(f" {k.replace('_', '-')}={r['args'].get(k)}" for k in varying)
            rows.setdefault(label, {}).setdefault(r["args"]["n_labeled"], []).append(r)
    return rows


def cell(runs: list[dict], key: str) -> str:
    """Mean +- std of the finished runs of a cell; diverged runs are counted beside it, never averaged in."""
    values = [r["results"][key] for r in runs if "results" in r]
    diverged = sum("diverged" in r for r in runs)
    text = mean_std(values) if values else ""
    return (text + f" + {diverged} diverged" if text else f"{diverged} diverged") if diverged else text


def table_header(columns: list[int]) -> list[str]:
    """The two header lines of a report table: one column per number of labels."""
    return ["| algorithm | " + " | ".join(f"{n} labels" for n in columns) + " |", "|---|" + "---|" * len(columns)]


def paired_differences(rows: dict[str, dict[int, list[dict]]], baseline: str = "supervised",
                       key: str = "final_top1") -> list[str]:
    """Markdown lines: each row's top-1 minus the baseline row's, seed by seed, at each number of labels.

    A seed fixes the labeled split (every script calls labeled_split with its --seed), so the two runs of a
    pair learn from the same labeled images and the split's part of the seed-to-seed noise cancels. Cells:
    the mean +- sample std of the differences in points (number of pairs) and on how many seeds the row is
    above the baseline. Nothing when there is no single baseline row."""
    if baseline not in rows:
        return []
    base = {n: {r["args"]["seed"]: r["results"][key] for r in runs if "results" in r}
            for n, runs in rows[baseline].items()}
    columns = sorted({n for cells in rows.values() for n in cells})
    lines = [f"## Difference from {baseline}, paired by seed (top-1 points, final evaluation)", "",
             *table_header(columns)]
    for label, cells in rows.items():
        if label == baseline:
            continue
        texts = []
        for n in columns:
            diffs = [100 * (r["results"][key] - base[n][r["args"]["seed"]]) for r in cells.get(n, [])
                     if "results" in r and r["args"]["seed"] in base.get(n, {})]
            if not diffs:
                texts.append("")
            elif len(diffs) == 1:
                texts.append(f"{diffs[0]:+.2f} (1)")
            else:
                above = sum(d > 0 for d in diffs)
                texts.append(f"{statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs):.2f} ({len(diffs)}; "
                             f"above on {above}/{len(diffs)})")
        lines.append(f"| {label} | " + " | ".join(texts) + " |")
    return lines + ["", f"Each seed's run minus the {baseline} run of the same seed, which has the same labeled "
                    "images: mean ± sample std over the seeds (number of pairs).", ""]


def markdown_report(finished: list[dict], unfinished: list[dict], out: str, baseline: str = "supervised") -> str:
    diverged = [r for r in unfinished if "diverged" in r]
    unfinished = [r for r in unfinished if "diverged" not in r]
    rows = group_runs(finished + diverged)
    columns = sorted({n for cells in rows.values() for n in cells})
    lines = [f"# Results under `{out}`", ""]
    tables = (("Top-1 accuracy (%), final evaluation", "final_top1"),
              ("Top-1 accuracy (%), median of the last 20 evaluations", "median_last20_top1"),
              ("Top-1 accuracy (%), best evaluation", "best_top1"),
              ("Top-5 accuracy (%), final evaluation", "final_top5"))
    for title, key in tables if rows else ():
        lines += [f"## {title}", "", *table_header(columns)]
        for label, cells in rows.items():
            lines.append(f"| {label} | " + " | ".join(
                cell(cells[n], key) if n in cells else "" for n in columns) + " |")
        lines.append("")
    if rows:
        lines += ["Cells: mean ± sample std over seeds (number of seeds). EMA model, full test set.", ""]
        lines += paired_differences(group_runs(finished), baseline)
    settings = {}
    for label, cells in rows.items():
        args = next(iter(cells.values()))[0]["args"]
        settings[label] = ", ".join(f"{k}={v}" for k, v in sorted(args.items()) if k not in NOT_A_SETTING)
    if settings:
        lines += ["## Settings of each row", ""] + [f"- **{label}**: {s}" for label, s in settings.items()] + [""]
    if any(" " in label for label in rows):
        lines += ["Rows with `flag=value` in their name are runs of one algorithm whose arguments differ;"
                  " they are reported apart, never averaged together.", ""]
    if diverged:
        lines += ["## Diverged runs (stopped on a non-finite loss; counted in their cells, never averaged)", ""]
        for r in diverged:
            d = r["diverged"]
            lines.append(f"- `{r['folder']}`: loss {d['loss']} at step {d['step']} (last checkpoint: step "
                         f"{d['checkpoint_step']})")
        lines.append("")
    if unfinished:
        lines += ["## Unfinished runs", ""]
        for r in unfinished:
            a = r["args"]
            total = a.get("epochs", 0) * a.get("steps_per_epoch", 0)
            done = r["metrics"][-1]["step"] if r["metrics"] else 0
            last = f", last EMA top-1 {100 * r['metrics'][-1]['test_top1']:.2f}%" if r["metrics"] else ""
            lines.append(f"- `{r['folder']}`: step {done}/{total}{last}")
        lines.append("")
    return "\n".join(lines)


def run_table(run: dict) -> str:
    """One run's evaluations as a Markdown table: epoch, mean train loss since the previous evaluation, and the
    EMA model's test top-1 and top-5 (the format people paste into write-ups)."""
    lines = [f"# `{run['folder']}`", "", "| epoch | step | train loss | test top-1 (%) | test top-5 (%) |",
             "|---|---|---|---|---|"]
    for m in run["metrics"]:
        loss = f"{m['loss']:.4f}" if isinstance(m.get("loss"), float) else "–"
        lines.append(f"| {m['epoch']:g} | {m['step']} | {loss} | {100 * m['test_top1']:.2f} | "
                     f"{100 * m['test_top5']:.2f} |")
    return "\n".join(lines) + "\n"


PANELS = (("final_top1", "final evaluation"), ("median_last20_top1", "median of the last 20 evaluations"))


def plot_accuracy_vs_labels(finished: list[dict], path: str, panels: tuple = PANELS) -> None:
    """Top-1 against the number of labels, one line per row of the tables, error bars = std over seeds;
    one panel per (results key, title): by default at the final evaluation and as the median of the last 20
    (the same when a run has fewer than 20)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), sharey=True, squeeze=False)
    axes = axes[0]
    colours = algorithm_colours(finished)
    for ax, (key, title) in zip(axes, panels):
        for label, cells in group_runs(finished).items():
            ns = sorted(cells)
            accs = [[100 * r["results"][key] for r in cells[n]] for n in ns]
            errors = [statistics.stdev(a) if len(a) > 1 else 0 for a in accs]
            ax.errorbar(ns, [statistics.mean(a) for a in accs], yerr=errors,
                        marker="o", capsize=3, label=label, color=colours[label.split()[0]])
        ax.set_xscale("log")
        ns = sorted({r["args"]["n_labeled"] for r in finished})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_xlabel("number of labeled images")
        ax.set_title(f"EMA test top-1 (%), {title}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def algorithm_colours(runs: list[dict]) -> dict[str, str]:
    """One colour per algorithm, the same in every plot."""
    return {a: f"C{i}" for i, a in enumerate(dict.fromkeys(ALGORITHMS + sorted(r["algorithm"] for r in runs)))}


def plot_curves(finished: list[dict], path: str) -> None:
    """Against step, one line per row of the tables and number of labels: EMA test top-1, and the mask rate and
    pseudo-label accuracy where the script logs them. With several seeds the line is their mean at each
    evaluation they all reached and the band spans the lowest to the highest seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("test_top1", "EMA test top-1"), ("mask_rate", "mask rate (confident fraction)"),
              ("pseudo_acc", "pseudo-label accuracy (all unlabeled)")]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4))
    # One colour per algorithm and one line style per number of labels, the same in every panel.
    colours = algorithm_colours(finished)
    sizes = sorted({r["args"]["n_labeled"] for r in finished}, reverse=True)
    for label, cells in group_runs(finished).items():
        for n, runs in sorted(cells.items(), reverse=True):
            style = ["-", "--", ":", "-."][sizes.index(n) % 4]
            name = f"{label}, {n} labels" + (f" ({len(runs)} seeds)" if len(runs) > 1 else "")
            for ax, (key, _) in zip(axes, panels):
                series = [{m["step"]: m[key] for m in r["metrics"] if m.get(key) is not None} for r in runs]
                steps = sorted(set.intersection(*(set(s) for s in series)))
                if not steps:
                    continue
                values = [[s[step] for s in series] for step in steps]
                colour = colours[label.split()[0]]
                ax.plot(steps, [statistics.mean(v) for v in values], marker=".", linestyle=style, color=colour,
                        label=name)
                if len(runs) > 1:
                    ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=colour,
                                    alpha=0.15, linewidth=0)
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(0.83, 0.5), fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.83, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out: str, baseline: str = "supervised") -> str | None:
    """Write and print the report of every run under `out`, with differences paired by seed against the
    `baseline` algorithm's runs; None when there is no run."""
    finished, unfinished = load_runs(out)
    if not finished and not unfinished:
        return None
    text = markdown_report(finished, unfinished, out, baseline)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    for run in finished + unfinished:  # each run's per-evaluation table beside its metrics.jsonl
        with open(os.path.join(run["folder"], "metrics.md"), "w") as f:
            f.write(run_table(run))
    if finished:
        plot_accuracy_vs_labels(finished, os.path.join(out, "accuracy_vs_labels.png"))
        plot_curves(finished, os.path.join(out, "curves.png"))
    print(text)
    print(f"wrote {os.path.join(out, 'results.md')}" + (" and the plots" if finished else ""))
    return text


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Flags after -- are passed to every script that accepts them.")
    p.add_argument("--algorithms", nargs="+", default=["fixmatch"], metavar="NAME",
                   help=f"any of {', '.join(ALGORITHMS)}")
    p.add_argument("--n-labeled", nargs="+", type=int, default=[250], metavar="N", help="numbers of labeled images")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="S",
                   help="seeds (labeled split, init, batches)")
    p.add_argument("--sweep", nargs="+", default=[], metavar="FLAG=V1,V2",
                   help="sweep any script flag, e.g. batch-size=32,64")
    p.add_argument("--out", default="runs", help="folder holding one folder per run, and the report")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids, one run per GPU at a time (default: all "
                   "visible; CPU if none)")
    p.add_argument("--per-gpu", type=int, default=1, metavar="N",
                   help="runs at once on each GPU (default 1): a small model's step leaves a large GPU mostly idle")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="runs at once on the CPU when there is no GPU (default 1); each gets cores / N threads "
                   "unless OMP_NUM_THREADS is set")
    p.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    p.add_argument("--slurm", action="store_true", help="write <out>/grid.sbatch (a SLURM array job) and stop")
    p.add_argument("--report", action="store_true", help="only aggregate the runs under --out")
    p.add_argument("--baseline", default="supervised", choices=ALGORITHMS, help="the report's paired differences "
                   "are against this algorithm's run of the same seed (default: supervised)")
    return p.parse_args(argv), extra


def visible_gpus() -> list[str]:
    import torch
    return [str(i) for i in range(torch.cuda.device_count())]


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    if args.report:
        if report(args.out, args.baseline) is None:
            print(f"error: no runs under {args.out} (no folder holding an args.json); pass the grid's --out",
                  file=sys.stderr)
            return 2
        return 0
    try:
        unknown = [a for a in args.algorithms if a not in ALGORITHMS]
        if unknown:
            raise UsageError(f"unknown algorithm {unknown[0]!r}; choose from {', '.join(ALGORITHMS)}")
        bad = [n for n in args.n_labeled if not 10 <= n <= 50000]
        if bad:
            raise UsageError(f"--n-labeled must be between 10 and 50000, got {bad[0]}")
        if args.per_gpu < 1 or args.jobs < 1:
            raise UsageError(f"--per-gpu and --jobs must be >= 1, got {min(args.per_gpu, args.jobs)}")
        sweep = parse_sweep(args.sweep)
        runs = expand_grid(args.algorithms, args.n_labeled, args.seeds, sweep,
                           route_extra(args.algorithms, extra, sweep), args.out)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for r in runs:
            print(("# finished: " if is_finished(r) else "") + shlex.join(["python", *r["cmd"][1:]]))
        return 0
    if args.slurm:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "grid.sbatch")
        with open(path, "w") as f:
            f.write(slurm_script(runs, args.out))
        print(f"wrote {path}: submit with `sbatch {path}`")
        return 0
    gpus = args.gpus.split(",") if args.gpus else visible_gpus()
    if gpus and args.jobs > 1:
        print(f"error: --jobs is for runs on the CPU; on GPU {','.join(gpus)} use --per-gpu N", file=sys.stderr)
        return 2
    if not gpus and args.per_gpu > 1:
        print("error: --per-gpu needs a GPU and none is visible; on the CPU use --jobs N", file=sys.stderr)
        return 2
    failed = run_grid(runs, worker_envs(gpus, args.per_gpu, args.jobs))
    report(args.out, args.baseline)
    for r in failed:
        print(f"failed: {r['name']}, log {r['folder']}.log", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `compare.py --dry-run | head`: the reader is gone, so say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
