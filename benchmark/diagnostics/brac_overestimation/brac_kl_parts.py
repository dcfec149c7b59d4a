"""Split BRAC's D_KL(pi || pi_beta) on each task's own data states (its first 5000) into the part from the
means and the part from the spreads, in closed form for the two pre-tanh Gaussians:
    KL = sum_d (mu_pi - mu_beta)^2 / (2 sigma_beta^2)
       + sum_d [log(sigma_beta / sigma_pi) + sigma_pi^2 / (2 sigma_beta^2) - 1/2],
to see how an actor that over-estimates leaves pi_beta (BRAC no sharing seed 2 between 40k and 80k steps).

Usage, from the repository root, on run folders (benchmark/diagnostics/brac_overestimation/README.md):
    python benchmark/diagnostics/brac_overestimation/brac_kl_parts.py runs-40k/runs/brac_noshare__imbalanced__{1,2,3}
Output of the README's runs (BRAC no sharing at cpu-40k, no sharing and CDS at cpu-80k): brac_kl_parts.txt.
The networks are built with each checkpoint's own sizes.
"""

import importlib.util
import os
import sys

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


data, _ = b.load_mixture(b.Args(mixture="imbalanced"))
for d in sys.argv[1:]:
    ck = torch.load(f"{d}/checkpoint.pt", weights_only=False)
    actor, beh = networks(ck, "actor", "behavior")
    out = []
    for i, t in enumerate(ck["tasks"]):
        o = torch.tensor(
            (data["observations"][data["source"] == i][:5000] - ck["obs_mean"]) / ck["obs_std"], dtype=torch.float32
        )
        ids = torch.full((len(o),), i)
        with torch.no_grad():
            m, ls = actor(o, ids)
            bm, bls = beh(o, ids)
        s2, bs2 = (2 * ls).exp(), (2 * bls).exp()
        mean_part = ((m - bm) ** 2 / (2 * bs2)).sum(-1).mean().item()
        spread_part = (bls - ls + s2 / (2 * bs2) - 0.5).sum(-1).mean().item()
        out.append(
            f"{t}: KL {mean_part + spread_part:5.2f} = mean {mean_part:5.2f} + spread {spread_part:5.2f}; "
            f"log-std pi {ls.mean():+.2f} beta {bls.mean():+.2f}; "
            f"|mean| pi {m.abs().mean():.2f} beta {bm.abs().mean():.2f}"
        )
    print(d.rstrip("/").split("/")[-1], ck["step"])
    for line in out:
        print("   ", line)
