"""BRAC at 20k steps: how well pi_beta(.|s, jump) fits jump's data, overall and at the start of episodes;
and which running transitions CDS would route to jump now (their time step in the episode).

Usage, from the repository root, on run folders of the cpu-20k budget (benchmark/diagnostics/jump/README.md):
    python benchmark/diagnostics/jump/brac_jump_behavior_fit.py runs-20k/runs/brac_noshare__imbalanced__{1,2,3} ...
Output of the README's runs: brac_jump_behavior_fit.txt. The networks are built with each checkpoint's own sizes.
"""

import importlib.util
import os
import sys

import numpy as np
import torch

if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
    print(__doc__)
    sys.exit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2)
torch.set_num_threads(1)
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
spec = importlib.util.spec_from_file_location("b", os.path.join(ROOT, "brac_mt_cds.py"))
b = importlib.util.module_from_spec(spec)
spec.loader.exec_module(b)


def networks(ckpt, *names):
    """The run's networks, built with the checkpoint's own task count, width and depth, with its weights."""
    classes = {"actor": b.Actor, "behavior": b.BehaviorModel, "critic": b.TwinCritic}
    nets = [classes[n](len(ckpt["tasks"]), ckpt["args"]["hidden_dim"], ckpt["args"]["n_hidden"]) for n in names]
    for name, net in zip(names, nets):
        net.load_state_dict(ckpt[name])
    return nets


def rms(actions, data_actions, mask):
    return ((actions[mask] - data_actions[mask]) ** 2).mean().sqrt().item()


args = b.Args(mixture="imbalanced")
data, _ = b.load_mixture(args)
all_obs = np.concatenate([data["observations"], data["next_observations"]])
mean, std = all_obs.mean(0), all_obs.std(0) + 1e-3
src = data["source"]
J = 2
ends = data["terminals"] | data["timeouts"]
t = np.zeros(len(src), int)
for k in range(1, len(src)):
    t[k] = 0 if (ends[k - 1] or src[k] != src[k - 1]) else t[k - 1] + 1
obs_all = torch.tensor((data["observations"] - mean) / std, dtype=torch.float32)
act_all = torch.tensor(data["actions"])
sel = src == J
early = sel & (t < 50)
print("jump episodes:", int((sel & (t == 0)).sum()), "running episodes:", int((~sel & (t == 0)).sum()))
for d in sys.argv[1:]:
    ck = torch.load(f"{d}/checkpoint.pt", weights_only=False)
    beh, critic = networks(ck, "behavior", "critic")
    with torch.no_grad():
        ids = torch.full((len(src),), J)
        lp = beh.log_prob(obs_all, ids, act_all)
        pb = beh.act(obs_all, ids)
        q = critic(obs_all, ids, act_all).min(0).values.numpy()
    thr = np.quantile(q[sel], 0.10)
    passed = (~sel) & (q >= thr)
    print(
        f"{d.split('/')[-1]:30s} logp(jump data) {lp[sel].mean():6.2f} (t<50: {lp[early].mean():6.2f}) | "
        f"rms beta-a {rms(pb, act_all, sel):.3f} (t<50: {rms(pb, act_all, early):.3f}) "
        f"| running data over jump's 10th pct: {passed.mean() / (~sel).mean() * 100:4.1f}%, "
        f"of them t<50: {(passed & (t < 50)).sum() / max(passed.sum(), 1) * 100:4.1f}% "
        f"(all running t<50: {((~sel) & (t < 50)).sum() / (~sel).sum() * 100:.1f}%)"
    )
