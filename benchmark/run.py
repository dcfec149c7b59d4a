"""Run the benchmark grid (methods x mixtures x seeds) and report it.

    python benchmark/run.py --budget cpu --workers 2            # run the grid, 2 processes at a time
    python benchmark/run.py --budget paper --print-commands      # one command per line, for a cluster
    python benchmark/run.py --mode report --budget cpu           # results table, score figure, learning curves
    python benchmark/run.py --budget cpu-20k --workdir runs-20k  # the cpu configuration, twice as long
    python benchmark/run.py --budget cpu-40k --workdir runs-40k --continue-from runs-20k  # those runs, on to 40k

A run is finished when its summary.json's steps_done reaches the budget's steps (HCSAC: epochs x steps per
epoch); finished runs are skipped, and a run with a checkpoint short of them (interrupted, or continued from a
shorter budget) is resumed with --resume. `--continue-from <workdir of a shorter budget>` starts every grid run
that has no folder in --workdir yet as a copy of <that workdir>/runs/<run_name>/ (when it holds a checkpoint),
which is then resumed to this budget's steps. Resume is exact, so a continued CQL or BRAC run is the run trained
straight to the longer budget; HCSAC's epochs grow with the budget, so a continued HCSAC run keeps the shorter
budget's relabelling schedule for the steps it had done.

Runs live in <workdir>/runs/<method>__<mixture>__<seed>/ as every script writes them. `report` copies each
summary.json into benchmark/results/<budget>/ (small files, committed) and builds from them results.md, one score
figure (scores_<mixture>.png: each seed's average normalised score, per method family) and one learning-curve PNG
(curves_<mixture>.png) per mixture.
"""

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("run_forward", "run_backward", "jump")  # MT-Walker2d's, the default domain's
OTHER_DOMAINS = {  # the tasks of the other domains, whose grid mixtures are <domain>-<mixture>
    "maze-medium": tuple(f"goal_{k}" for k in range(3)),
    "maze-large": tuple(f"goal_{k}" for k in range(7)),
    "dmc-walker": ("walk", "run"),
    "door-drawer": ("door_open", "door_close", "drawer_open", "drawer_close"),
}
SUCCESS_DOMAINS = ("maze-", "door-drawer-")  # grid mixtures whose returns are success rates, reported in %


def tasks_of(mixture):
    """The tasks of a grid mixture: MT-Walker2d's, or those of the domain that names it."""
    for domain, tasks in OTHER_DOMAINS.items():
        if mixture.startswith(domain + "-"):
            return tasks
    return TASKS


def domain_flags(mixture):
    """The script flags of a grid mixture: another domain's is <domain>-<its mixture>, e.g. maze-medium-undirected."""
    for domain in OTHER_DOMAINS:
        if mixture.startswith(domain + "-"):
            return ["--domain", domain, "--mixture", mixture[len(domain) + 1 :]]
    return ["--mixture", mixture]


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
# The CDS threshold: the grid's cql_cds and brac_cds take the domain's default (MT-Walker2d: the own batch's 10th
# percentile, the mazes: its 90th); p10 and p90 set it, k50 is the median (named after the old flag, --cds-percentile
# k, the threshold at p = 100 - k)
SWEEPS = {
    "cql_cds_p10": ("cql_mt_cds", ["--cds-threshold-percentile", "10"]),
    "cql_cds_k50": ("cql_mt_cds", ["--cds-threshold-percentile", "50"]),
    "cql_cds_p90": ("cql_mt_cds", ["--cds-threshold-percentile", "90"]),
    "brac_cds_p10": ("brac_mt_cds", ["--share", "cds", "--cds-threshold-percentile", "10"]),
    "brac_cds_k50": ("brac_mt_cds", ["--share", "cds", "--cds-threshold-percentile", "50"]),
    "brac_cds_p90": ("brac_mt_cds", ["--share", "cds", "--cds-threshold-percentile", "90"]),
    "brac_cds_basic": ("brac_mt_cds", ["--share", "cds", "--cds-basic"]),
    "brac_noshare_a0.1": ("brac_mt_cds", ["--share", "none", "--alpha", "0.1"]),
    "brac_shareall_a0.1": ("brac_mt_cds", ["--share", "all", "--alpha", "0.1"]),
    "brac_cds_a0.1_k50": ("brac_mt_cds", ["--share", "cds", "--alpha", "0.1", "--cds-threshold-percentile", "50"]),
    "brac_cds_a0.3_k50": ("brac_mt_cds", ["--share", "cds", "--alpha", "0.3", "--cds-threshold-percentile", "50"]),
    "brac_cds_a3": ("brac_mt_cds", ["--share", "cds", "--alpha", "3.0"]),
}
# one task's data and one task's network (the HCSAC project's CSAC): run once per task, `<method>_<task>`; the
# report joins a seed's per-task runs into one row named <method>
PER_TASK = {"csac": ("cql_mt_noshare", [])}
PER_TASK_RUNS = {
    f"{method}_{task}": (script, [*flags, "--tasks", task])
    for method, (script, flags) in PER_TASK.items()
    for task in ("walk", "run")
}
ALL_METHODS = {**METHODS, **SWEEPS, **PER_TASK_RUNS}
# budget name -> gradient steps, steps between evaluations, flags for every script, extra flags per script
BUDGETS = {
    # the paper-scale configuration: every script at its defaults, 1M steps
    "paper": {"steps": 1_000_000, "eval_every": 10_000, "common": [], "per_script": {}},
    # the reduced configuration that fits 2 CPU cores (see the README): 2x256 networks, 4 sampled
    # actions of each kind in CQL's logsumexp, 10k gradient steps, a 10k-step behaviour-model warm-up
    # for BRAC
    "cpu": {
        "steps": 10_000,
        "eval_every": 1_000,
        "common": ["--n-hidden", "2"],
        "per_script": {
            "cql_mt_noshare": ["--cql-n-actions", "4"],
            "cql_mt_shareall": ["--cql-n-actions", "4"],
            "cql_mt_cds": ["--cql-n-actions", "4"],
            "hcsac": ["--cql-n-actions", "4"],
            "brac_mt_cds": ["--behavior-warmup-steps", "10000", "--actor-warmup-steps", "1000"],
        },
    },
}
# the same reduced configuration run 2, 4 and 8 times as long (the committed runs of each were continued from the
# shorter budget's checkpoints, as --continue-from does)
BUDGETS["cpu-20k"] = {**BUDGETS["cpu"], "steps": 20_000}
BUDGETS["cpu-40k"] = {**BUDGETS["cpu"], "steps": 40_000}
BUDGETS["cpu-80k"] = {**BUDGETS["cpu"], "steps": 80_000}
# the mazes' configuration that fits 2 CPU cores: smaller networks for the 4-dim observations (2x128), 4 sampled actions
# of each kind, 10k gradient steps (the 30k-step learning curve in benchmark/README.md, ### maze, chose them)
BUDGETS["maze"] = {
    "steps": 10_000,
    "eval_every": 1_000,
    "common": ["--n-hidden", "2", "--hidden-dim", "128"],
    "per_script": {**BUDGETS["cpu"]["per_script"]},
}
# the budget probe that chose it: the same configuration for 30k steps
BUDGETS["maze-30k"] = {**BUDGETS["maze"], "steps": 30_000}
# dm-control's walker (HCSAC's benchmark): the `cpu` configuration, probed for 20k steps to see where MTCSAC plateaus
BUDGETS["dmc-probe"] = {**BUDGETS["cpu"], "steps": 20_000}
# and its grid: the same configuration for 15k steps (the probe's MTCSAC scored the same over 11-15k as over 16-20k)
BUDGETS["dmc"] = {**BUDGETS["cpu"], "steps": 15_000}
# the door and drawer (the CDS paper's manipulation tasks): the `cpu` configuration, probed for 20k steps with CQL no
# sharing on both mixtures to find where it plateaus
BUDGETS["dd-probe"] = {**BUDGETS["cpu"], "steps": 20_000}
# and its grid: the same configuration for 15k steps (the probe: no sharing levels off by 6k steps on medium-replay,
# by 11-15k on imbalanced)
BUDGETS["dd"] = {**BUDGETS["cpu"], "steps": 15_000}
# <budget>-bf16: the same with bfloat16 autocast in the CQL scripts and HCSAC (about twice as fast on a CPU with bf16
# matrix units; BRAC gains less and stays in fp32), used on a domain once it is shown to learn as in fp32 there
for name in ("cpu", "dmc", "dd"):
    bf16 = {
        script: [*flags, "--bf16"] for script, flags in BUDGETS[name]["per_script"].items() if script != "brac_mt_cds"
    }
    BUDGETS[f"{name}-bf16"] = {**BUDGETS[name], "per_script": {**BUDGETS[name]["per_script"], **bf16}}
# the mazes: the CDS threshold sweep (its p = 90 rows are CDS at the mazes' default; the p = 10 runs were made as
# cql_cds and brac_cds while p = 10 was every domain's default), beside the baselines
MAZE_METHODS = ["cql_noshare", "cql_shareall", "cql_cds_p10", "cql_cds_k50", "cql_cds_p90", "cql_cds_basic"]
MAZE_METHODS += [m.replace("cql", "brac") for m in MAZE_METHODS]
DMC_METHODS = ["mtcsac", "hcsac", "cql_noshare", "cql_cds", "cql_shareall", "csac_walk", "csac_run"]
GRID = {
    "imbalanced": list(METHODS),
    "all-medium": ["cql_noshare", "cql_shareall", "cql_cds"],
    "maze-medium-undirected": MAZE_METHODS + ["mtcsac", "hcsac"],
    "maze-medium-directed": MAZE_METHODS + ["mtcsac", "hcsac"],
    "maze-large-undirected": MAZE_METHODS,
    "maze-large-directed": MAZE_METHODS,
    "dmc-walker-medium": DMC_METHODS,
    "dmc-walker-medium-replay": DMC_METHODS,
    "door-drawer-imbalanced": [m for m in METHODS if m not in ("mtcsac", "hcsac")],
    "door-drawer-medium-replay": [m for m in METHODS if m not in ("mtcsac", "hcsac")],
}


@dataclass
class Args:
    mode: str = "run"
    """`run` the grid, or `report` the finished runs"""
    budget: str = "cpu"
    """`cpu` (the reduced configuration, 10k steps), `cpu-20k`, `cpu-40k` and `cpu-80k` (the same, 20k, 40k and
    80k steps), `maze` (the mazes' reduced configuration, 10k steps), `maze-30k` (its 30k-step probe), `dmc-probe`
    (the cpu configuration for 20k steps on dm-control's walker), `dmc` (its grid: 15k steps), `dd-probe` (the same
    20k steps on door-drawer), `dd` (its grid: 15k steps), `cpu-bf16`, `dmc-bf16` and `dd-bf16` (those with bf16
    autocast in the CQL scripts and HCSAC) or `paper` (every script at its defaults, 1M steps)"""
    methods: Annotated[tuple[str, ...], tyro.conf.arg(help_behavior_hint="(default: the grid of each mixture)")] = ()
    """methods to include"""
    mixtures: tuple[str, ...] = ("imbalanced", "all-medium")
    """dataset mixtures: imbalanced, all-medium, or another domain's: maze-medium-undirected, dmc-walker-medium, ..."""
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
    continue_from: Annotated[str, tyro.conf.arg(help_behavior_hint="(default: none)")] = ""
    """the workdir of a shorter budget: a grid run with no folder in --workdir yet starts as a copy of its
    <continue-from>/runs/<run_name>/ (when that holds a checkpoint), resumed to this budget's steps"""
    results_dir: Annotated[str, tyro.conf.arg(help_behavior_hint="(default: benchmark/results/<budget>)")] = ""
    """where `report` writes"""


def grid(args):
    """Seed by seed, so that a grid stopped part-way has every method on its first seeds."""
    for seed in args.seeds:
        for mixture in args.mixtures:
            for method in args.methods or GRID[mixture]:
                yield method, mixture, seed


def command(method, mixture, seed, args):
    """The command line of one run, from the budget (HCSAC counts in epochs: 100 epochs of steps/100)."""
    budget = BUDGETS[args.budget]
    script, flags = ALL_METHODS[method]
    steps, eval_every = budget["steps"], budget["eval_every"]
    if script == "hcsac":
        # the HCSAC slides' schedule is 1000 epochs of 1000 steps, relabelling every 100 epochs; a shorter budget
        # keeps its shape: 100 epochs of steps/100, relabelling every 10 epochs (MTCSAC: never)
        if args.budget != "paper":
            per_epoch = steps // 100
            flags = [
                "--epochs",
                "100",
                "--steps-per-epoch",
                str(per_epoch),
                "--eval-every-epochs",
                str(max(eval_every // per_epoch, 1)),
                "--checkpoint-every-epochs",
                "5",
                *(flags if flags else ["--relabel-every", "10"]),
            ]
    else:
        flags = [
            "--total-steps",
            str(steps),
            "--eval-freq",
            str(eval_every),
            "--checkpoint-freq",
            str(eval_every),
        ] + flags
    run = [
        sys.executable,
        os.path.join(ROOT, script + ".py"),
        "--exp-name",
        method,
        *domain_flags(mixture),
        "--seed",
        str(seed),
        "--device",
        args.device,
        *budget["common"],
        *budget["per_script"].get(script, []),
        *flags,
    ]
    run_dir = os.path.normpath(os.path.join(args.workdir, "runs", f"{method}__{mixture}__{seed}"))
    return run, run_dir


def planned_steps(cmd, budget):
    """Gradient steps a command trains for, read from its flags as the script reads them: --total-steps, or
    HCSAC's --epochs x --steps-per-epoch; without them (the paper budget) the scripts' defaults, the budget's."""

    def flag(name):
        return int(cmd[cmd.index(name) + 1]) if name in cmd else None

    if flag("--epochs") is not None:
        return flag("--epochs") * flag("--steps-per-epoch")
    return flag("--total-steps") or BUDGETS[budget]["steps"]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def is_finished(summary, steps):
    """A run is finished when it has done the budget's steps: a run finished at a shorter budget is not."""
    return summary.get("steps_done", 0) >= steps


def status(run_dir, steps):
    """`finished` (summary.json's steps_done reaches steps), `interrupted` (a checkpoint short of them) or `new`."""
    summary = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary) and is_finished(read_json(summary), steps):
        return "finished"
    return "interrupted" if os.path.exists(os.path.join(run_dir, "checkpoint.pt")) else "new"


def continued_run(run_dir, args):
    """The shorter budget's run folder a run starts from with --continue-from, or None (no such run, or a
    folder already in --workdir, which then goes on by itself)."""
    if not args.continue_from or os.path.exists(run_dir):
        return None
    source = os.path.normpath(os.path.join(args.continue_from, "runs", os.path.basename(run_dir)))
    if os.path.exists(os.path.join(source, "checkpoint.pt")):
        return source
    if os.path.isdir(source):
        print(f"note: {source} holds no checkpoint.pt, so {run_dir} starts from scratch", file=sys.stderr)
    return None


def run_grid(args):
    if args.continue_from and not os.path.isdir(os.path.join(args.continue_from, "runs")):
        raise SystemExit(f"error: --continue-from {args.continue_from}: no runs/ folder there")
    todo = []
    for method, mixture, seed in grid(args):
        cmd, run_dir = command(method, mixture, seed, args)
        source = continued_run(run_dir, args)
        state = status(source or run_dir, planned_steps(cmd, args.budget))
        if state == "finished":  # (a continued run already as long as this budget is not copied either)
            continue
        if state == "interrupted":
            cmd.append("--resume")
        todo.append((cmd, run_dir, source))
    if args.print_commands:
        for cmd, run_dir, source in todo:
            if source:
                parent = os.path.dirname(run_dir)
                print(f"mkdir -p {shlex.quote(parent)} && cp -r {shlex.quote(source)} {shlex.quote(run_dir)}")
            print(shlex.join(cmd) if args.workdir == "." else f"cd {shlex.quote(args.workdir)} && {shlex.join(cmd)}")
        return
    print(f"{len(todo)} runs to do, {args.workers} at a time")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    running = []
    while todo or running:
        while todo and len(running) < args.workers:
            cmd, run_dir, source = todo.pop(0)
            if source:
                os.makedirs(os.path.dirname(run_dir), exist_ok=True)
                shutil.copytree(source, run_dir)
                print(f"copied {source} to {run_dir}")
            os.makedirs(run_dir, exist_ok=True)
            print(f"start {run_dir}")
            with open(os.path.join(run_dir, "stdout.log"), "a") as log:  # the child keeps its own copy open
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=args.workdir)
            running.append((proc, run_dir))
        time.sleep(5)
        for item in list(running):
            proc, run_dir = item
            if proc.poll() is not None:
                running.remove(item)
                outcome = {0: "done ", 130: "interrupted (resumes from its checkpoint)"}.get(
                    proc.returncode, f"FAILED ({proc.returncode})"
                )
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


# the batch each task trains on, CDS's routing (and Q-hat of own vs routed data), HCSAC's relabelling, BRAC's D_KL
DIAGNOSTIC_PREFIXES = ("batch/", "cds/", "relabel/", "brac/")


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
            late = values[-max(len(values) // 4, 1) :]
            if tag.endswith("/q_routed"):  # a step that routed nothing has no routed Q-hat: NaN (earlier runs: 0)
                values, late = values[np.isfinite(values) & (values != 0)], late[np.isfinite(late) & (late != 0)]
            out[tag] = {
                "mean": float(values.mean()) if len(values) else None,
                "last_quarter": float(late.mean()) if len(late) else None,
                "points": len(values),
            }
    return out


def last_quarter(runs, tag):
    """mean ± std over seeds of a diagnostic's mean over the last quarter of training."""
    digits = 3 if tag.startswith("batch/") or tag.endswith("fraction") else 1
    return mean_std([r.get("diagnostics", {}).get(tag, {}).get("last_quarter") for r in runs], digits)


def pair_table(methods, summaries, tag_of_pair, heading, tasks=TASKS):
    """One row per method that logged tag_of_pair(src, dst) for some pair, one column per source → target pair."""
    pairs = [(src, dst) for dst in tasks for src in tasks if src != dst]  # (source task, target task)
    rows = [m for m in methods if any(tag_of_pair(*p) in r.get("diagnostics", {}) for r in summaries[m] for p in pairs)]
    if not rows:
        return []
    lines = [f"\n{heading}, mean over the last quarter of training:\n"]
    lines += [
        "| method | " + " | ".join(f"{src} → {dst}" for src, dst in pairs) + " |",
        "|---" * (1 + len(pairs)) + "|",
    ]
    for m in rows:
        lines.append(f"| {m} | " + " | ".join(last_quarter(summaries[m], tag_of_pair(*p)) for p in pairs) + " |")
    return lines


def diagnostics_tables(mixture, methods, summaries):
    """Markdown tables of the sharing diagnostics: the make-up of each task's batch, CDS's routing and Q-hat,
    HCSAC's relabelling, BRAC's D_KL."""
    summaries, tasks = {m: summaries[(mixture, m)] for m in methods}, tasks_of(mixture)
    lines = pair_table(
        methods,
        summaries,
        lambda src, dst: f"batch/{dst}/from_{src}",
        "Share of each target task's batch drawn from each source task (weighted by the transitions' training weights)",
        tasks,
    )
    lines += pair_table(
        methods,
        summaries,
        lambda src, dst: f"cds/{src}_to_{dst}/routed_fraction",
        "CDS: fraction of each source task's candidates routed to each target task (the paper's CDS weight)",
        tasks,
    )
    cds = [m for m in methods if any(f"cds/{tasks[0]}/q_own" in r.get("diagnostics", {}) for r in summaries[m])]
    if cds:
        lines += [
            (
                "\nConservative Q-hat of each task's own batch and of the data routed to it, and the fraction of all "
                "its candidates routed, mean over the last quarter of training:\n"
            ),
            "| method | " + " | ".join(f"{t} Q-hat own / routed / fraction" for t in tasks) + " |",
            "|---" * (1 + len(tasks)) + "|",
        ]
        for m in cds:
            cells = [
                " / ".join(last_quarter(summaries[m], f"cds/{t}/{k}") for k in ("q_own", "q_routed", "routed_fraction"))
                for t in tasks
            ]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += pair_table(
        methods,
        summaries,
        lambda src, dst: f"relabel/{src}_to_{dst}/added_fraction",
        "HCSAC: share of each source task's whole dataset added to each target task at the heuristic relabelling",
        tasks,
    )
    brac = [m for m in methods if any(f"brac/{tasks[0]}/kl" in r.get("diagnostics", {}) for r in summaries[m])]
    if brac:
        lines += [
            (
                "\nD_KL(π ‖ π_β) per task (the actor against the behaviour model of the data the task trains on), "
                "mean over the last quarter of training:\n"
            ),
            "| method | " + " | ".join(tasks) + " |",
            "|---" * (1 + len(tasks)) + "|",
        ]
        for m in brac:
            lines.append(f"| {m} | " + " | ".join(last_quarter(summaries[m], f"brac/{t}/kl") for t in tasks) + " |")
    return lines


LATE_EVALS = 5


def late_scores(runs, tasks=TASKS):
    """Each run's average normalised score (over tasks) averaged over its last LATE_EVALS evaluations."""
    return [
        np.mean([e[t]["normalized_score"] for e in r["evals"][-LATE_EVALS:] for t in tasks])
        for r in runs
        if r.get("evals")
    ]


def late_table(methods, runs_of_methods, tasks=TASKS, scale=1):
    """Returns (times scale: 100 shows a maze's success rate in %) averaged over each run's last LATE_EVALS
    evaluations: steadier than one final evaluation when the policy still swings from one evaluation to the next."""
    lines = [
        f"\nMean over the last {LATE_EVALS} evaluations of each run, then mean ± std over seeds:\n",
        "| method | " + " | ".join(tasks) + " | average | avg. normalised |",
        "|---" * (3 + len(tasks)) + "|",
    ]
    for method, runs in zip(methods, runs_of_methods):
        late = [r["evals"][-LATE_EVALS:] for r in runs if r.get("evals")]
        row = [method]
        row += [mean_std([scale * np.mean([e[t]["return"] for e in evals]) for evals in late]) for t in tasks]
        row += [
            mean_std([scale * np.mean([e[t]["return"] for e in evals for t in tasks]) for evals in late]),
            mean_std(late_scores(runs, tasks)),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def join_per_task(summaries, mixture):
    """Each seed's per-task runs of a PER_TASK method (csac_walk, csac_run) joined into one summary under the
    method's name (csac), as if one run: each evaluation holds every task, its averages recomputed; `best` is the
    joined evaluation with the best average normalised score. Seeds missing a task are left out."""
    tasks = tasks_of(mixture)

    def merge(records):
        out = {"step": records[0]["step"], **{t: r[t] for t, r in zip(tasks, records)}}
        out["average_return"] = float(np.mean([out[t]["return"] for t in tasks]))
        out["average_normalized_score"] = float(np.mean([out[t]["normalized_score"] for t in tasks]))
        return out

    for method in PER_TASK:
        by_seed = [{r["args"]["seed"]: r for r in summaries.get((mixture, f"{method}_{t}"), [])} for t in tasks]
        joined = []
        for seed in sorted(set.intersection(*(set(runs) for runs in by_seed))):
            runs = [runs[seed] for runs in by_seed]
            evals = [merge(records) for records in zip(*(r["evals"] for r in runs))]
            joined.append(
                {
                    "steps_done": min(r["steps_done"] for r in runs),
                    "final": merge([r["final"] for r in runs]),
                    "best": max(evals, key=lambda e: e["average_normalized_score"]),
                    "evals": evals,
                    "args": {"seed": seed},
                }
            )
        if joined:
            summaries[(mixture, method)] = joined


def table_methods(methods):
    """The rows of a table: a PER_TASK method's runs (csac_walk, csac_run) show as one row (csac)."""
    rows = []
    for m in methods:
        name = next((base for base in PER_TASK if m.startswith(base + "_") and m in PER_TASK_RUNS), m)
        if name not in rows:
            rows.append(name)
    return rows


def report(args):
    out_dir = args.results_dir or os.path.join(ROOT, "benchmark", "results", args.budget)
    os.makedirs(out_dir, exist_ok=True)
    summaries = {}
    for method, mixture, seed in grid(args):
        cmd, run_dir = command(method, mixture, seed, args)
        path = os.path.join(run_dir, "summary.json")
        saved = os.path.join(out_dir, f"{method}__{mixture}__{seed}.json")
        if os.path.exists(path):
            summary = read_json(path)
            if not is_finished(summary, planned_steps(cmd, args.budget)):
                print(f"skipped (not finished): {run_dir}")
                continue
            summary["diagnostics"] = tensorboard_diagnostics(run_dir)
            summary["command"] = shlex.join(["python", os.path.relpath(cmd[1], ROOT), *cmd[2:]])
            text = json.dumps(summary, indent=1).replace(ROOT + os.sep, "")  # repository-relative paths
            with open(saved, "w") as f:
                f.write(text)
            summary = json.loads(text)
        elif os.path.exists(saved):  # committed earlier
            summary = read_json(saved)
        else:
            continue
        summaries.setdefault((mixture, method), []).append(summary)

    lines = [f"# Results: budget `{args.budget}`\n"]
    for mixture in args.mixtures:
        join_per_task(summaries, mixture)
        methods = [m for m in table_methods(args.methods or GRID[mixture]) if (mixture, m) in summaries]
        if not methods:
            continue
        tasks, scale = tasks_of(mixture), 100 if mixture.startswith(SUCCESS_DOMAINS) else 1  # success in %
        lines += [
            f"\n## {mixture}\n",
            (
                "Return (a maze, door-drawer: success rate in %) at the end of training (final) and at the evaluation "
                "with the best average normalised score, mean ± std over seeds; normalised score 0 = random policy, "
                "100 = the expert (the walker's expert behaviour policy; a scripted controller).\n"
            ),
            "| method | seeds | steps | "
            + " | ".join(f"{t} final" for t in tasks)
            + " | average final | average at the best evaluation | avg. normalised final |",
            "|---" * (6 + len(tasks)) + "|",
        ]
        for method in methods:
            runs = summaries[(mixture, method)]
            finals = [r["final"] for r in runs if r.get("final")]
            row = [method, str(len(runs)), ", ".join(sorted({str(r["steps_done"]) for r in runs}))]
            row += [mean_std([scale * f[t]["return"] for f in finals]) for t in tasks]
            row += [
                mean_std([scale * f["average_return"] for f in finals]),
                mean_std([scale * r["best"]["average_return"] for r in runs if r.get("best")]),
                mean_std([f["average_normalized_score"] for f in finals]),
            ]
            lines.append("| " + " | ".join(row) + " |")
        lines += late_table(methods, [summaries[(mixture, m)] for m in methods], tasks, scale)
        lines += diagnostics_tables(mixture, methods, summaries)
        if plot_scores(summaries, mixture, methods, os.path.join(out_dir, f"scores_{mixture}.png")):
            lines.append(f"\n![average normalised score of each seed, {mixture}](scores_{mixture}.png)")
        plot_curves(summaries, mixture, methods, os.path.join(out_dir, f"curves_{mixture}.png"))
        lines.append(f"\n![learning curves, {mixture}](curves_{mixture}.png)\n")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out_dir}/results.md")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# the score figure's panels: a method belongs to its script's family; x order none / all / CDS (or HCSAC)
FAMILIES = {
    "CQL": ("cql_mt_noshare", "cql_mt_shareall", "cql_mt_cds"),
    "BRAC": ("brac_mt_cds",),
    "HCSAC / MTCSAC": ("hcsac",),
}


def sharing_rank(method):
    if method in PER_TASK:  # one network per task, before the multi-task network without sharing
        return -1
    return 0 if "noshare" in method or method.startswith("mtcsac") else 1 if "shareall" in method else 2


def plot_scores(summaries, mixture, methods, path):
    """The paper's question at a glance: one panel per method family, each seed's average normalised score over
    its last LATE_EVALS evaluations a dot, the mean over seeds a bar, the random policy (0) a line. Returns
    whether a figure was written (no family present: none)."""
    panels = []
    for family, scripts in FAMILIES.items():
        members = [m for m in methods if ALL_METHODS.get(m, PER_TASK.get(m, ("",)))[0] in scripts]
        if members:
            panels.append((family, sorted(members, key=sharing_rank)))  # stable: the grid's order within a rank
    if not panels:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(max(1.3 + 1.25 * sum(len(m) for _, m in panels), 5.5), 4.0),
        sharey=True,
        squeeze=False,
        gridspec_kw={"width_ratios": [len(m) for _, m in panels]},
    )
    for ax, (family, members) in zip(axes[0], panels):
        ax.axhline(0.0, color="gray", linestyle="--", linewidth=1, label="random policy")
        for x, method in enumerate(members):
            scores = late_scores(summaries[(mixture, method)], tasks_of(mixture))
            offsets = np.linspace(-0.12, 0.12, len(scores)) if len(scores) > 1 else [0.0]
            ax.scatter(x + np.asarray(offsets), scores, s=22, color=f"C{x}", zorder=3)
            ax.hlines(np.mean(scores), x - 0.3, x + 0.3, color="black", linewidth=2, zorder=4)
        ax.set_xticks(range(len(members)), members, rotation=20, fontsize=8)
        ax.set_xlim(-0.6, len(members) - 0.4)
        ax.set_title(family)
    axes[0][0].set_ylabel("avg. normalised score")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(
        f"{mixture}: average normalised score over each run's last {LATE_EVALS} evaluations\n"
        "one dot per seed, bar = mean over seeds; 0 = random policy, 100 = expert",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_curves(summaries, mixture, methods, path):
    plt = pyplot()

    tasks = tasks_of(mixture)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6))
    for ax, task in zip(axes, tasks):
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
        if method not in ALL_METHODS:
            raise SystemExit(f"error: unknown method {method!r}; choose from {', '.join(ALL_METHODS)}")
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
