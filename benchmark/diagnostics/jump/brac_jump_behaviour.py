"""What BRAC's actor does on jump: roll out the actor (mean action) with the jump one-hot and report the
return, episode length, mean forward velocity, mean |velocity| and mean torso height, beside the same
for the expert data of jump, to tell a walker that jumps from one that runs or falls.

Usage, from the repository root, on run folders (benchmark/diagnostics/jump/README.md):
    python benchmark/diagnostics/jump/brac_jump_behaviour.py runs-40k/runs/brac_cds__imbalanced__{1,2,3} ...
Output of the README's runs (BRAC no sharing and CDS at cpu-40k and cpu-80k, all three modes at cpu-20k):
brac_jump_behaviour.txt. The actor is built with each checkpoint's own sizes.
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


args = b.Args(mixture="imbalanced")
data, _ = b.load_mixture(args)
all_obs = np.concatenate([data["observations"], data["next_observations"]])
mean, std = all_obs.mean(0), all_obs.std(0) + 1e-3
J, EP = 2, 5
o = data["observations"][data["source"] == J]  # Walker2d observation: [0] torso height, [8] forward velocity
print(
    f"jump expert data: height {o[:, 0].mean():.2f}, forward velocity {o[:, 8].mean():+.2f}, "
    f"|velocity| {np.abs(o[:, 8]).mean():.2f}"
)
for d in sys.argv[1:]:
    ck = torch.load(f"{d}/checkpoint.pt", weights_only=False)
    (actor,) = networks(ck, "actor")
    envs = [b.make_env("jump") for _ in range(EP)]
    obs = np.stack([e.reset(seed=100 + k)[0] for k, e in enumerate(envs)])
    ret, done, length = np.zeros(EP), np.zeros(EP, bool), np.zeros(EP, int)
    h, v = [], []
    while not done.all():
        with torch.no_grad():
            a = actor.act(torch.tensor((obs - mean) / std, dtype=torch.float32), torch.full((EP,), J)).numpy()
        for k, e in enumerate(envs):
            if done[k]:
                continue
            obs[k], r, term, trunc, _ = e.step(a[k])
            ret[k] += r
            length[k] += 1
            done[k] = term or trunc
            h.append(obs[k][0])
            v.append(obs[k][8])
    h, v = np.array(h), np.array(v)
    print(
        f"{d.rstrip('/').split('/')[-1]} (step {ck['step']}): return {ret.mean():6.0f} (len {length.mean():4.0f}), "
        f"height {h.mean():.2f}, forward velocity {v.mean():+.2f}, |velocity| {np.abs(v).mean():.2f}",
        flush=True,
    )
