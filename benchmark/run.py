"""Run the benchmark grid (methods x mixtures x seeds) and report it.

    python benchmark/run.py --budget cpu --workers 2            # run the grid, 2 processes at a time
    python benchmark/run.py --budget paper --print-commands      # one command per line, for a cluster
    python benchmark/run.py --mode report --budget cpu           # results table and learning curves
    python benchmark/run.py --budget cpu-20k --workdir runs-20k  # the cpu configuration, twice as long

A run whose summary.json says finished is skipped; an interrupted one (a checkpoint, not finished)
is resumed with --resume. Runs live in runs/<method>__<mixture>__<seed>/ as every script writes them;
`report` copies each summary.json into benchmark/results/<budget>/ (small files, committed) and
builds results.md and one learning-curve PNG per mixture from them.
"""
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("run_forward", "run_backward", "jump")

# method name -> (script, its flags)
METHODS = {
    "cql_noshare": ("cql_mt_noshare", []),
    "cql_shareall": ("cql_mt_shareall", []),
    "cql_cds": ("cql_mt_cds", []),
    "cql_cds_basic": ("cql_mt_cds", ["--cds-basic"]),
    "brac_noshare": ("brac_mt_cds", ["--share", "none"]),
    "brac_shareall": ("brac_mt_cds", ["--share", "all"]),
    "brac_cds": ("brac_mt_cds", ["--share", "cds"]),
    "mtcsac": ("hcsac", ["--relabel-every", "0"]),
    "hcsac": ("hcsac", []),
}
# variations of the grid's methods: the sweeps that chose the defaults (run with --methods, reported
# with --results-dir benchmark/results/<budget>-sweeps)
SWEEPS = {
    "cql_cds_k50": ("cql_mt_cds", ["--cds-percentile", "50"]),
    "brac_cds_k50": ("brac_mt_cds", ["--share", "cds", "--cds-percentile", "50"]),
    "brac_noshare_a0.1": ("brac_mt_cds", ["--share", "none", "--alpha", "0.1"]),
    "brac_shareall_a0.1": ("brac_mt_cds", ["--share", "all", "--alpha", "0.1"]),
    "brac_cds_a0.1_k50": ("brac_mt_cds", ["--share", "cds", "--alpha", "0.1", "--cds-percentile", "50"]),
    "brac_cds_a0.3_k50": ("brac_mt_cds", ["--share", "cds", "--alpha", "0.3", "--cds-percentile", "50"]),
    "brac_cds_a3": ("brac_mt_cds", ["--share", "cds", "--alpha", "3.0"]),
}
# budget name -> gradient steps, steps between evaluations, flags for every script, extra flags per script
BUDGETS = {
    # the paper-scale configuration: every script at its defaults, 1M steps
    "paper": {"steps": 1_000_000, "eval_every": 10_000, "common": [], "per_script": {}},
    # the reduced configuration that fits 2 CPU cores (see the README): 2x256 networks, 4 sampled
    # actions of each kind in CQL's logsumexp, 10k gradient steps, a 10k-step behaviour-model warm-up
    # for BRAC
    "cpu": {"steps": 10_000, "eval_every": 1_000, "common": ["--n-hidden", "2"],
            "per_script": {"cql_mt_noshare": ["--cql-n-actions", "4"], "cql_mt_shareall": ["--cql-n-actions", "4"],
                           "cql_mt_cds": ["--cql-n-actions", "4"], "hcsac": ["--cql-n-actions", "4"],
                           "brac_mt_cds": ["--behavior-warmup-steps", "10000", "--actor-warmup-steps", "1000"]}},
}
# the same reduced configuration run twice as long. A `cpu` run copied into the `cpu-20k` runs folder with
# "finished" set to false in its summary.json is resumed from its 10k checkpoint (resume is exact).
BUDGETS["cpu-20k"] = {**BUDGETS["cpu"], "steps": 20_000}
BUDGETS["cpu-40k"] = {**BUDGETS["cpu"], "steps": 40_000}  # the same, four times as long (copied from cpu-20k)
BUDGETS["cpu-80k"] = {**BUDGETS["cpu"], "steps": 80_000}  # eight times as long (copied from cpu-40k)
GRID = {
    "imbalanced": list(METHODS),
    "all-medium": ["cql_noshare", "cql_shareall", "cql_cds"],
}


@dataclass
class Args:
    mode: str = "run"
    """`run` the grid, or `report` the finished runs"""
    budget: str = "cpu"
    """`cpu` (the reduced configuration, 10k steps), `cpu-20k`, `cpu-40k` and `cpu-80k` (the
    same, 20k, 40k and 80k steps) or `paper` (every script at its defaults, 1M steps)"""
    methods: tuple[str, ...] = ()
    """methods to include (default: the grid of each mixture)"""
    mixtures: tuple[str, ...] = ("imbalanced", "all-medium")
    """dataset mixtures"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds of every (method, mixture)"""
    workers: int = 2
    """runs at a time"""
    threads: int = 1
    """torch threads per run (OMP_NUM_THREADS)"""
    device: str = "auto"
    """passed to every script"""
    print_commands: bool = False
    """print the commands, one per line, instead of running them"""
    workdir: str = "."
    """the folder the scripts run in; they write their runs to <workdir>/runs/ (keep budgets apart)"""
    results_dir: str = ""
    """where `report` writes (default: benchmark/results/<budget>)"""


def grid(args):
    for mixture in args.mixtures:
        for method in args.methods or GRID[mixture]:
            for seed in args.seeds:
                yield method, mixture, seed


def command(method, mixture, seed, args):
    """The command line of one run, from the budget (HCSAC counts in epochs: 100 epochs of steps/100)."""
    budget = BUDGETS[args.budget]
    script, flags = {**METHODS, **SWEEPS}[method]
    steps, eval_every = budget["steps"], budget["eval_every"]
    if script == "hcsac":
        # seed 003's schedule is 1000 epochs of 1000 steps, relabelling every 100 epochs; a shorter budget
        # keeps its shape: 100 epochs of steps/100, relabelling every 10 epochs (MTCSAC: never)
        if args.budget != "paper":
            per_epoch = steps // 100
            flags = ["--epochs", "100", "--steps-per-epoch", str(per_epoch),
                     "--eval-every-epochs", str(max(eval_every // per_epoch, 1)), "--checkpoint-every-epochs", "5",
                     *(flags if flags else ["--relabel-every", "10"])]
    else:
        flags = ["--total-steps", str(steps), "--eval-freq", str(eval_every), "--checkpoint-freq", str(eval_every)] + flags
    run = [sys.executable, os.path.join(ROOT, script + ".py"), "--exp-name", method, "--mixture", mixture,
           "--seed", str(seed), "--device", args.device, *budget["common"], *budget["per_script"].get(script, []), *flags]
    run_dir = os.path.normpath(os.path.join(args.workdir, "runs", f"{method}__{mixture}__{seed}"))
    return run, run_dir


def status(run_dir):
    summary = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary) and json.load(open(summary)).get("finished"):
        return "finished"
    return "interrupted" if os.path.exists(os.path.join(run_dir, "checkpoint.pt")) else "new"


def run_grid(args):
    todo = []
    for method, mixture, seed in grid(args):
        cmd, run_dir = command(method, mixture, seed, args)
        state = status(run_dir)
        if state == "finished":
            continue
        if state == "interrupted":
            cmd.append("--resume")
        todo.append((cmd, run_dir))
    if args.print_commands:
        for cmd, _ in todo:
            print(shlex.join(cmd) if args.workdir == "." else f"cd {shlex.quote(args.workdir)} && {shlex.join(cmd)}")
        return
    print(f"{len(todo)} runs to do, {args.workers} at a time")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    running = []
    while todo or running:
        while todo and len(running) < args.workers:
            cmd, run_dir = todo.pop(0)
            os.makedirs(run_dir, exist_ok=True)
            log = open(os.path.join(run_dir, "stdout.log"), "a")
            print(f"start {run_dir}")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=args.workdir), run_dir, log))
        time.sleep(5)
        for item in list(running):
            proc, run_dir, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                outcome = {0: "done ", 130: "interrupted (resumes from its checkpoint)"}.get(proc.returncode, f"FAILED ({proc.returncode})")
                print(f"{outcome} {run_dir}")


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def mean_std(values, digits=1):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:  # one seed: no spread to report
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


DIAGNOSTIC_PREFIXES = ("sharing/", "cds/", "brac/")  # routed fractions, Q-hat of own vs routed data, D_KL


def tensorboard_diagnostics(run_dir):
    """Sharing and divergence scalars of one run from its TensorBoard events: for each tag, the mean over
    the whole run and over its last quarter (the event files are not committed; these numbers are)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    out = {}
    for tag in events.Tags()["scalars"]:
        if tag.startswith(DIAGNOSTIC_PREFIXES):
            values = np.array([e.value for e in events.Scalars(tag)])
            late = values[-max(len(values) // 4, 1):]
            if tag.endswith("/q_routed"):  # a step that routed nothing has no routed Q-hat: NaN (earlier runs: 0)
                values, late = values[np.isfinite(values) & (values != 0)], late[np.isfinite(late) & (late != 0)]
            out[tag] = {"mean": float(values.mean()) if len(values) else None,
                        "last_quarter": float(late.mean()) if len(late) else None, "points": len(values)}
    return out


def diagnostics_tables(mixture, methods, summaries):
    """Markdown tables of the sharing diagnostics: routed fractions, Q-hat own vs routed, D_KL."""
    lines = []

    def late(runs, tag):
        digits = 3 if tag.startswith("sharing/") or tag.endswith("fraction") else 1
        return mean_std([r.get("diagnostics", {}).get(tag, {}).get("last_quarter") for r in runs], digits)

    pairs = [f"{src}_to_{dst}" for dst in TASKS for src in TASKS if src != dst]
    sharing = [m for m in methods if any(f"sharing/{p}" in r.get("diagnostics", {}) for r in summaries[(mixture, m)] for p in pairs)]
    if sharing:
        lines += ["\nFraction of each source task's data that reaches each target task (the CDS weight; for share-all "
                  "the share of the target's batch drawn from the source; for HCSAC the share of the source's "
                  "dataset added at relabelling), mean over the last quarter of training:\n",
                  "| method | " + " | ".join(p.replace("_to_", " → ") for p in pairs) + " |", "|---" * (1 + len(pairs)) + "|"]
        for m in sharing:
            lines.append(f"| {m} | " + " | ".join(late(summaries[(mixture, m)], f"sharing/{p}") for p in pairs) + " |")
    cds = [m for m in methods if any(f"cds/{TASKS[0]}/q_own" in r.get("diagnostics", {}) for r in summaries[(mixture, m)])]
    if cds:
        lines += ["\nConservative Q-hat of each task's own batch and of the data routed to it, and the fraction of "
                  "candidates routed, mean over the last quarter of training:\n",
                  "| method | " + " | ".join(f"{t} Q-hat own / routed / fraction" for t in TASKS) + " |", "|---" * (1 + len(TASKS)) + "|"]
        for m in cds:
            runs = summaries[(mixture, m)]
            lines.append(f"| {m} | " + " | ".join(
                f"{late(runs, f'cds/{t}/q_own')} / {late(runs, f'cds/{t}/q_routed')} / {late(runs, f'cds/{t}/routed_fraction')}"
                for t in TASKS) + " |")
    brac = [m for m in methods if any(f"brac/{TASKS[0]}/kl" in r.get("diagnostics", {}) for r in summaries[(mixture, m)])]
    if brac:
        lines += ["\nD_KL(π ‖ π_β) per task (the actor against the behaviour model of the data the task trains on), "
                  "mean over the last quarter of training:\n",
                  "| method | " + " | ".join(TASKS) + " |", "|---" * (1 + len(TASKS)) + "|"]
        for m in brac:
            lines.append(f"| {m} | " + " | ".join(late(summaries[(mixture, m)], f"brac/{t}/kl") for t in TASKS) + " |")
    return lines


LATE_EVALS = 5


def late_table(methods, runs_of_methods):
    """Returns averaged over each run's last LATE_EVALS evaluations: steadier than one final evaluation
    when the policy still swings from one evaluation to the next."""
    lines = [f"\nMean over the last {LATE_EVALS} evaluations of each run, then mean ± std over seeds:\n",
             "| method | " + " | ".join(TASKS) + " | average | avg. normalised |", "|---" * (3 + len(TASKS)) + "|"]
    for method, runs in zip(methods, runs_of_methods):
        late = [r["evals"][-LATE_EVALS:] for r in runs if r.get("evals")]
        row = [method] + [mean_std([np.mean([e[t]["return"] for e in evals]) for evals in late]) for t in TASKS]
        row += [mean_std([np.mean([e[t]["return"] for e in evals for t in TASKS]) for evals in late]),
                mean_std([np.mean([e[t]["normalized_score"] for e in evals for t in TASKS]) for evals in late])]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def report(args):
    out_dir = args.results_dir or os.path.join(ROOT, "benchmark", "results", args.budget)
    os.makedirs(out_dir, exist_ok=True)
    summaries = {}
    for method, mixture, seed in grid(args):
        _, run_dir = command(method, mixture, seed, args)
        path = os.path.join(run_dir, "summary.json")
        saved = os.path.join(out_dir, f"{method}__{mixture}__{seed}.json")
        if os.path.exists(path):
            summary = json.load(open(path))
            if not summary.get("finished"):
                print(f"skipped (not finished): {run_dir}")
                continue
            summary["diagnostics"] = tensorboard_diagnostics(run_dir)
            cmd = command(method, mixture, seed, args)[0]
            summary["command"] = shlex.join(["python", os.path.relpath(cmd[1], ROOT), *cmd[2:]])
            text = json.dumps(summary, indent=1).replace(ROOT + os.sep, "")  # repository-relative paths
            with open(saved, "w") as f:
                f.write(text)
            summary = json.loads(text)
        elif os.path.exists(saved):  # committed earlier
            summary = json.load(open(saved))
        else:
            continue
        summaries.setdefault((mixture, method), []).append(summary)

    lines = [f"# Results: budget `{args.budget}`\n"]
    for mixture in args.mixtures:
        methods = [m for m in (args.methods or GRID[mixture]) if (mixture, m) in summaries]
        if not methods:
            continue
        lines += [f"\n## {mixture}\n", "Return at the end of training (final) and at the evaluation with the best average normalised score, "
                  "mean ± std over seeds; normalised score 0 = random policy, 100 = the dataset's expert policy.\n",
                  "| method | seeds | steps | " + " | ".join(f"{t} final" for t in TASKS) +
                  " | average final | average at the best evaluation | avg. normalised final |", "|---" * (6 + len(TASKS)) + "|"]
        for method in methods:
            runs = summaries[(mixture, method)]
            finals = [r["final"] for r in runs if r.get("final")]
            row = [method, str(len(runs)), ", ".join(sorted({str(r["steps_done"]) for r in runs}))]
            row += [mean_std([f[t]["return"] for f in finals]) for t in TASKS]
            row += [mean_std([f["average_return"] for f in finals]),
                    mean_std([r["best"]["average_return"] for r in runs if r.get("best")]),
                    mean_std([f["average_normalized_score"] for f in finals])]
            lines.append("| " + " | ".join(row) + " |")
        lines += late_table(methods, [summaries[(mixture, m)] for m in methods])
        lines += diagnostics_tables(mixture, methods, summaries)
        plot_curves(summaries, mixture, methods, os.path.join(out_dir, f"curves_{mixture}.png"))
        lines.append(f"\n![learning curves, {mixture}](curves_{mixture}.png)\n")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out_dir}/results.md")


def plot_curves(summaries, mixture, methods, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 3.6))
    for ax, task in zip(axes, TASKS):
        for method in methods:
            curves = [[(e["step"], e[task]["return"]) for e in r["evals"]] for r in summaries[(mixture, method)]]
            length = min(len(c) for c in curves)
            if length == 0:
                continue
            steps = np.array([s for s, _ in curves[0][:length]])
            values = np.array([[v for _, v in c[:length]] for c in curves])
            ax.plot(steps, values.mean(0), label=method)
            ax.fill_between(steps, values.mean(0) - values.std(0), values.mean(0) + values.std(0), alpha=0.2)
        ax.set_title(f"{task} ({mixture})")
        ax.set_xlabel("gradient steps")
        ax.set_ylabel("return")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(args: Args):
    if args.budget not in BUDGETS:
        raise SystemExit(f"error: unknown budget {args.budget!r}; choose from {', '.join(BUDGETS)}")
    for method in args.methods:
        if method not in METHODS and method not in SWEEPS:
            raise SystemExit(f"error: unknown method {method!r}; choose from {', '.join([*METHODS, *SWEEPS])}")
    for mixture in args.mixtures:
        if mixture not in GRID:
            raise SystemExit(f"error: unknown mixture {mixture!r}; choose from {', '.join(GRID)}")
    if args.mode == "run":
        run_grid(args)
    elif args.mode == "report":
        report(args)
    else:
        raise SystemExit(f"error: unknown mode {args.mode!r}; choose run or report")


if __name__ == "__main__":
    main(tyro.cli(Args))
