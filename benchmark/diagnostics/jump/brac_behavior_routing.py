"""Isolate the behaviour model: fit pi_beta as BRAC does (10k warm-up steps on own data, then 20k more),
either on own data only or with routing at the rates BRAC + CDS measured (random, not Q-based), and
roll pi_beta(.|s, jump) out on jump. Does routing jump's data to the running tasks hurt jump's model?

Needs no run: it trains its own behaviour model, sized as the cpu budget's (Args with n_hidden=2: two
hidden layers of 256). Usage, from the repository root (MODE none or cds, then a seed; each run about
5 minutes on one core):
    python benchmark/diagnostics/jump/brac_behavior_routing.py cds 1
Output of the README's runs (seeds 1-3, each mode): brac_behavior_routing.txt.
"""

import importlib.util
import os
import sys

import numpy as np
import torch

if len(sys.argv) < 3 or sys.argv[1] in ("-h", "--help"):
    print(__doc__)
    sys.exit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2)
torch.set_num_threads(1)
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
spec = importlib.util.spec_from_file_location("b", os.path.join(ROOT, "brac_mt_cds.py"))
b = importlib.util.module_from_spec(spec)
spec.loader.exec_module(b)

mode, seed = sys.argv[1], int(sys.argv[2])
args = b.Args(mixture="imbalanced", n_hidden=2)
data, _ = b.load_mixture(args)
all_obs = np.concatenate([data["observations"], data["next_observations"]])
mean, std = all_obs.mean(0), all_obs.std(0) + 1e-3
buf = {
    "obs": torch.tensor((data["observations"] - mean) / std, dtype=torch.float32),
    "next_obs": torch.tensor((data["next_observations"] - mean) / std, dtype=torch.float32),
    "actions": torch.tensor(data["actions"]),
    "rewards_all": torch.tensor(data["rewards_all"]),
    "terminals_all": torch.tensor(data["terminals_all"], dtype=torch.float32),
    "source": torch.tensor(data["source"]),
}
sizes = torch.tensor(data["sizes"])
starts = torch.cumsum(sizes, 0) - sizes
n_tasks = len(args.tasks)
# rate[dst, src]: BRAC + CDS's measured mean routed fractions at 20k steps (three seeds)
rate = torch.tensor([[0.0, 0.04, 0.88], [0.15, 0.0, 0.86], [0.028, 0.012, 0.0]])
torch.manual_seed(seed)
np.random.seed(seed)
beh = b.BehaviorModel(n_tasks, args.hidden_dim, args.n_hidden)
opt = torch.optim.Adam(beh.parameters(), lr=args.behavior_lr)


def rollout(episodes=10):
    envs = [b.make_env("jump") for _ in range(episodes)]
    obs = np.stack([e.reset(seed=1000 * seed + k)[0] for k, e in enumerate(envs)])
    ret = np.zeros(episodes)
    done = np.zeros(episodes, bool)
    ids = torch.full((episodes,), 2)
    while not done.all():
        with torch.no_grad():
            a = beh.act(torch.tensor((obs - mean) / std, dtype=torch.float32), ids).numpy()
        for k, e in enumerate(envs):
            if done[k]:
                continue
            obs[k], r, term, trunc, _ = e.step(a[k])
            ret[k] += r
            done[k] = term or trunc
    return ret


out = []
for step in range(1, 30001):
    if step <= 10000 or mode == "none":
        batch, _ = b.sample_none(buf, starts, sizes, args)
    else:
        own = b.sample_own(starts, sizes, args.batch_size)
        cand = b.sample_others(starts, sizes, args.cds_candidates)
        src = buf["source"][cand]
        routed = torch.rand(cand.shape) < rate[torch.arange(n_tasks)[:, None], src]
        idx = torch.cat([own, cand], 1)
        w = torch.cat([torch.ones(own.shape), routed.float()], 1)
        batch = b.gather(buf, idx, w)
    loss = -b.per_task_mean(beh.log_prob(batch["obs"], batch["task_ids"], batch["actions"]), batch["weights"])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 10000 == 0:
        r = rollout()
        out.append(f"{step // 1000}k: {r.mean():5.0f} ({(r > 1000).sum()}/10 >1000)")
print(mode, seed, " | ".join(out), flush=True)
