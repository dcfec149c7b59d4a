"""On jump's states: how far the actor's action under jump's one-hot is from pi_beta, from the data, and from its own
action under the running tasks' one-hots; per BRAC run at 20k steps, beside the run's jump return.

Usage, from the repository root, on run folders of the cpu-20k budget (benchmark/diagnostics/jump/README.md):
    python benchmark/diagnostics/jump/brac_jump_actor.py runs-20k/runs/brac_noshare__imbalanced__{1,2,3} ...
Output of the README's runs: brac_jump_actor.txt. The networks are built with each checkpoint's own sizes.
"""

import importlib.util
import json
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


def rms(x, y):
    return ((x - y) ** 2).mean().sqrt().item()


args = b.Args(mixture="imbalanced")
data, _ = b.load_mixture(args)
all_obs = np.concatenate([data["observations"], data["next_observations"]])
mean, std = all_obs.mean(0), all_obs.std(0) + 1e-3
src = data["source"]
J = 2
sel = src == J
obs = torch.tensor((data["observations"][sel] - mean) / std, dtype=torch.float32)
act = torch.tensor(data["actions"][sel])
for d in sys.argv[1:]:
    ck = torch.load(f"{d}/checkpoint.pt", weights_only=False)
    with open(f"{d}/summary.json") as f:
        s = json.load(f)
    l5 = np.mean([e["jump"]["return"] for e in s["evals"][-5:]])
    actor, beh, critic = networks(ck, "actor", "behavior", "critic")
    with torch.no_grad():
        pis = [actor.act(obs, torch.full((len(obs),), t)) for t in range(len(ck["tasks"]))]
        pb = beh.act(obs, torch.full((len(obs),), J))
        ids = torch.full((len(obs),), J)
        # the critic's sensitivity: Q(s, pi_jump) - Q(s, a_data) and Q(s, pi_rf) under jump
        qd, qj, qf, qb = (critic(obs, ids, a).min(0).values for a in (act, pis[J], pis[0], pis[1]))
    print(
        f"{d.split('/')[-1]:32s} step {ck['step']} jump last5 {l5:6.0f} | rms pi_j-beta {rms(pis[J], pb):.3f} "
        f"pi_j-a {rms(pis[J], act):.3f} pi_j-pi_rf {rms(pis[J], pis[0]):.3f} pi_j-pi_rb {rms(pis[J], pis[1]):.3f} | "
        f"Q_jump(a) {qd.mean():.1f} (pi_j) {qj.mean():.1f} (pi_rf) {qf.mean():.1f} (pi_rb) {qb.mean():.1f}"
    )
