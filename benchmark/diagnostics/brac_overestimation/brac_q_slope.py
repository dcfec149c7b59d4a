"""How hard the critic pulls BRAC's actor away from pi_beta, on each task's own data states (its first 5000).

The actor minimises alpha * KL(pi || pi_beta) - Q(s, tanh(u)). With Q linearised around the actor's mean,
Q(tanh(u)) ~ Q0 + g . (u - mu), the mean part of the KL, sum_d (mu_d - mu_beta_d)^2 / (2 sigma_beta_d^2), is
smallest-loss at mu - mu_beta = sigma_beta^2 g / alpha, where it equals
    sum_d (sigma_beta_d g_d)^2 / (2 alpha^2),
so the pull |sigma_beta * g| (g = dQ/du at the actor's mean, in units of pi_beta's spread) sets how far the
actor's mean sits from pi_beta's at a given alpha. Printed per task: the run's alpha (learned with --target-kl,
else --alpha), the measured mean part of the KL, the pull, the mean part it predicts at that alpha, and Q-hat at
the actor's mean action minus Q-hat at the data's action (how much more the critic values the actor's action).

Usage, from the repository root, on run folders (benchmark/diagnostics/brac_overestimation/README.md):
    python benchmark/diagnostics/brac_overestimation/brac_q_slope.py runs-40k/runs/brac_noshare__imbalanced__{1,2,3}
Output for the README's runs: brac_q_slope.txt. The networks are built with each checkpoint's own sizes.
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
    actor, behavior, critic = networks(ck, "actor", "behavior", "critic")
    learned = ck["args"].get("target_kl") is not None
    alphas = ck["log_alpha"].exp().tolist() if learned else [ck["args"]["alpha"]] * len(ck["tasks"])
    print(d.rstrip("/").split("/")[-1], ck["step"])
    for i, t in enumerate(ck["tasks"]):
        own = data["source"] == i
        o = torch.tensor((data["observations"][own][:5000] - ck["obs_mean"]) / ck["obs_std"], dtype=torch.float32)
        a_data = torch.tensor(data["actions"][own][:5000])
        ids = torch.full((len(o),), i)
        with torch.no_grad():
            mean, log_std = actor(o, ids)
            b_mean, b_log_std = behavior(o, ids)
        u = mean.clone().requires_grad_(True)
        q_pi = critic(o, ids, torch.tanh(u)).min(0).values
        (g,) = torch.autograd.grad(q_pi.sum(), u)
        with torch.no_grad():
            q_data = critic(o, ids, a_data).min(0).values
        b_std = b_log_std.exp()
        mean_part = ((mean - b_mean) ** 2 / (2 * b_std**2)).sum(-1).mean().item()
        pull = (b_std * g).norm(dim=-1)
        predicted = (0.5 * pull**2).mean().item() / alphas[i] ** 2
        print(
            f"    {t:12s}: alpha {alphas[i]:5.2f} | KL mean part {mean_part:6.2f} "
            f"| pull |sigma_beta dQ/du| {pull.mean():6.2f} "
            f"(predicts {predicted:6.2f}) | Q(pi) - Q(data) {(q_pi.detach() - q_data).mean():+7.1f} "
            f"| Q(data) {q_data.mean():7.1f}"
        )
