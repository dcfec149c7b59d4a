"""Which transitions CDS routes, and whether they lead to the goal. For each CDS run given (its folder, with
checkpoint.pt), every transition of the task files is scored under every task i by the run's last critic, Q-hat =
min(Q1, Q2), and the other tasks' transitions are routed to i by each of CDS's threshold rules: the 10th, 50th or
90th percentile of Q-hat over task i's own data, or its mean (--cds-basic). The runs threshold over one own batch of
256; here the threshold is taken over all of task i's own data (the same percentile, without the batch's noise).

Per pair (source j -> target i), for each rule: the fraction of j's transitions routed to i, and how many of those
lead to goal i: the transition's episode reaches goal i (reward 1 under task i) at that step or later. Beside them, the
same fraction over all of j's transitions and over i's own, and the mean Q-hat of i's own data. If Q-hat picked the
transitions useful to task i, the routed ones would lead to its goal more often than j's transitions do on average.
An episode is a stretch of a file between two ends (its own task's terminal, or a time limit), as in
maze_goal_reaches.py. Works for any domain whose score is a success (the mazes, door-drawer).

Usage, from the repository root:
    python benchmark/diagnostics/maze/cds_routing.py RUN_DIR [RUN_DIR ...]
"""

import importlib.util
import os
import sys

import numpy as np
import torch

RULES = ("p10", "p50", "p90", "basic")  # the threshold: a percentile of the own data's Q-hat, or its mean
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def leads_to_goal(reached, ends):
    """(N, T) bool: the transition's episode reaches goal i at this step or later (ends: the episodes' last rows)."""
    out, start = np.zeros_like(reached), 0
    for end in ends:
        out[start : end + 1] = np.flip(np.logical_or.accumulate(np.flip(reached[start : end + 1], 0), 0), 0)
        start = end + 1
    return out


@torch.no_grad()
def probe(run_dir):
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), map_location="cpu", weights_only=False)
    saved = ckpt["args"]
    m = load_script("brac_mt_cds" if "share" in saved else "cql_mt_cds")
    args = m.Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    args.device = "cpu"
    _, buf, info = m.setup(args, m.LIMITS)
    domain, tasks = m.DOMAINS[args.domain], args.tasks
    critic = m.TwinCritic(len(tasks), args.hidden_dim, args.n_hidden, domain.obs_dim, domain.act_dim)
    critic.load_state_dict(ckpt["critic"])
    files = [dict(np.load(p)) for p in info["paths"]]
    reached = np.concatenate([domain.relabel(f, tasks)[1] for f in files])  # (N, T): s' reaches goal i
    offsets = np.cumsum([0] + [len(f["rewards"]) for f in files])
    ends = np.concatenate([np.flatnonzero(f["terminals"] | f["timeouts"]) + o for f, o in zip(files, offsets)])
    leads = leads_to_goal(reached, ends)
    source = buf["source"].numpy()
    q = np.zeros((len(source), len(tasks)), np.float32)
    for i in range(len(tasks)):
        for k in range(0, len(source), 65536):
            obs, act = buf["obs"][k : k + 65536], buf["actions"][k : k + 65536]
            q[k : k + 65536, i] = critic(obs, torch.full((len(obs),), i), act).min(0).values.numpy()
    rule = "basic" if args.cds_basic else f"p{args.cds_threshold_percentile:g}"
    print(f"\n# {os.path.basename(os.path.normpath(run_dir))}: step {ckpt['step']}, the run's rule: {rule}")
    print("Per rule: % of the source's transitions routed to the target / % of those that lead to the target's goal.")
    print("lead %: of all the source's transitions, of the target's own; Q-hat: the target's own data, mean")
    print("target  source  | lead % all  own | Q own | " + " | ".join(f"{r:>6}: routed lead" for r in RULES))
    for i, dst in enumerate(tasks):
        own = q[source == i, i]
        thresholds = [own.mean() if r == "basic" else np.percentile(own, float(r[1:])) for r in RULES]
        for j, src in enumerate(tasks):
            if j == i:
                continue
            from_j, cells = source == j, []
            for threshold in thresholds:
                routed = from_j & (q[:, i] >= threshold)
                lead = 100 * leads[routed, i].mean() if routed.any() else np.nan
                cells.append(f"{100 * routed.sum() / from_j.sum():13.1f} {lead:4.0f}")
            lead_all, lead_own = 100 * leads[from_j, i].mean(), 100 * leads[source == i, i].mean()
            print(f"{dst:<7} {src:<7} | {lead_all:10.1f} {lead_own:4.0f} | {own.mean():5.1f} | " + " | ".join(cells))


if __name__ == "__main__":
    if sys.argv[1:2] in ([], ["-h"], ["--help"]):
        print(__doc__)
        sys.exit(0)
    for run_dir in sys.argv[1:]:
        probe(run_dir)
