"""Jump rollouts of a = pi_beta_mean + lam * (pi_mean - pi_beta_mean) for BRAC checkpoints: at what
deviation from the behaviour model does the walker fall?

Usage, from the repository root, on run folders of the cpu-20k budget (lam = 0: pi_beta alone; 1: the actor;
benchmark/diagnostics/jump/README.md):
    python benchmark/diagnostics/jump/brac_jump_rollouts.py 0,0.5,1 runs-20k/runs/brac_noshare__imbalanced__{1,2,3} ...
Output of the README's runs: brac_jump_rollouts.txt. The networks are built with each checkpoint's own sizes.
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


def networks(ckpt, *names):
    """The run's networks, built with the checkpoint's own task count, width and depth, with its weights."""
    classes = {"actor": b.Actor, "behavior": b.BehaviorModel, "critic": b.TwinCritic}
    nets = [classes[n](len(ckpt["tasks"]), ckpt["args"]["hidden_dim"], ckpt["args"]["n_hidden"]) for n in names]
    for name, net in zip(names, nets):
        net.load_state_dict(ckpt[name])
    return nets


args = b.Args(mixture="imbalanced")
data, _ = b.load_mixture(args)
all_obs = np.concatenate([data["observations"], data["next_observations"]])
mean, std = all_obs.mean(0), all_obs.std(0) + 1e-3
J, EP = 2, 5
lams = [float(x) for x in sys.argv[1].split(",")]
for d in sys.argv[2:]:
    ck = torch.load(f"{d}/checkpoint.pt", weights_only=False)
    actor, beh = networks(ck, "actor", "behavior")
    out = []
    for lam in lams:
        envs = [b.make_env("jump") for _ in range(EP)]
        obs = np.stack([e.reset(seed=100 + k)[0] for k, e in enumerate(envs)])
        ret, done, length = np.zeros(EP), np.zeros(EP, bool), np.zeros(EP, int)
        ids = torch.full((EP,), J)
        while not done.all():
            o = torch.tensor((obs - mean) / std, dtype=torch.float32)
            with torch.no_grad():
                pa, pb = actor.act(o, ids), beh.act(o, ids)
            a = (pb + lam * (pa - pb)).clamp(-1, 1).numpy()
            for k, e in enumerate(envs):
                if done[k]:
                    continue
                obs[k], r, term, trunc, _ = e.step(a[k])
                ret[k] += r
                length[k] += 1
                done[k] = term or trunc
        out.append(f"lam {lam}: {ret.mean():6.0f} (len {length.mean():4.0f}, {int((ret > 1000).sum())}/{EP} >1000)")
    print(d.split("/")[-1], " | ".join(out), flush=True)
