"""BRAC + CDS: the KL estimate, the behaviour model, the losses, the sharing rules, smoke runs, resume, bad input."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, run_script

SCRIPT = "brac_mt_cds"
TASKS = ("run_forward", "run_backward", "jump")
TINY = [
    "--hidden-dim",
    "32",
    "--n-hidden",
    "2",
    "--batch-size",
    "32",
    "--cds-candidates",
    "32",
    "--behavior-warmup-steps",
    "20",
    "--actor-warmup-steps",
    "10",
    "--eval-episodes",
    "1",
    "--log-freq",
    "10",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def m(modules):
    return modules[SCRIPT]


def scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def constant_gaussian(cls, mean, log_std):
    """An Actor-shaped network whose output is (mean, log_std) for every state: zero head weights."""
    net = cls(3, 8, 1)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.cat([mean, log_std]))
    return net


def gaussian_kl(mean_p, log_std_p, mean_b, log_std_b):
    """Closed form KL(N(mean_p, std_p^2) || N(mean_b, std_b^2)) of diagonal Gaussians."""
    var_p, var_b = (2 * log_std_p).exp(), (2 * log_std_b).exp()
    return (log_std_b - log_std_p + (var_p + (mean_p - mean_b) ** 2) / (2 * var_b) - 0.5).sum()


# ---------------------------------------------------------------- the divergence D(s) = KL(pi || pi_beta)
def test_kl_estimate_matches_the_closed_form_for_gaussians(m):
    mean_p, log_std_p = (
        torch.tensor([0.3, -0.5, 1.0, 0.0, 0.2, -1.0]),
        torch.tensor([-0.5, -1.0, 0.0, -0.3, -0.7, -0.2]),
    )
    mean_b, log_std_b = (
        torch.tensor([0.0, 0.0, 0.5, 0.4, -0.3, -0.5]),
        torch.tensor([-0.2, -0.6, -0.4, 0.0, -1.0, -0.5]),
    )
    actor, behavior = (
        constant_gaussian(m.Actor, mean_p, log_std_p),
        constant_gaussian(m.BehaviorModel, mean_b, log_std_b),
    )
    obs, ids = torch.randn(4, 17), torch.tensor([0, 1, 2, 0])
    exact = gaussian_kl(mean_p, log_std_p, mean_b, log_std_b).item()
    torch.manual_seed(0)
    kl, u, log_pi = m.kl_estimate(actor, behavior, obs, ids, 50_000)
    assert kl.shape == (4,) and u.shape == (50_000, 4, 6) and log_pi.shape == (50_000, 4)
    torch.testing.assert_close(kl, torch.full((4,), exact), atol=0.03, rtol=0.0)
    # the u are samples of pi's Gaussian
    torch.testing.assert_close(u.mean(0), mean_p.expand(4, 6), atol=0.03, rtol=0.0)
    torch.testing.assert_close(u.std(0), log_std_p.exp().expand(4, 6), atol=0.03, rtol=0.0)
    # pi = pi_beta: every sample's log-ratio is exactly zero
    same = constant_gaussian(m.BehaviorModel, mean_p, log_std_p)
    assert (m.kl_estimate(actor, same, obs, ids, 16)[0] == 0).all()


def test_kl_of_tanh_gaussians_equals_the_kl_of_their_gaussians(m):
    """KL is invariant under a shared bijection: scoring tanh-space samples with both tanh-Gaussians'
    full log-densities (Jacobians included) gives the Gaussians' KL, sample by sample."""
    mean_p, log_std_p = (
        torch.tensor([0.3, -0.5, 0.5, 0.0, 0.2, -0.4]),
        torch.tensor([-0.5, -1.0, -0.6, -0.8, -0.7, -0.9]),
    )
    mean_b, log_std_b = (
        torch.tensor([0.0, 0.1, 0.2, 0.4, -0.3, -0.5]),
        torch.tensor([-0.2, -0.6, -0.4, -0.5, -1.0, -0.5]),
    )
    actor, behavior = (
        constant_gaussian(m.Actor, mean_p, log_std_p),
        constant_gaussian(m.BehaviorModel, mean_b, log_std_b),
    )
    obs, ids = torch.randn(3, 17), torch.tensor([0, 1, 2])
    torch.manual_seed(0)
    kl, u, log_pi = m.kl_estimate(actor, behavior, obs, ids, 20_000)
    a = torch.tanh(u)
    assert a.abs().max() < 1 - m.ACTION_EPS  # no sample is clipped by log_prob
    tanh_space = log_pi - behavior.log_prob(obs, ids, a)  # log pi(a) - log pi_beta(a), each with its Jacobian
    gauss_space = m.gaussian_log_prob(u, mean_p, log_std_p) - m.gaussian_log_prob(u, mean_b, log_std_b)
    torch.testing.assert_close(tanh_space, gauss_space, atol=2e-3, rtol=0.0)
    exact = gaussian_kl(mean_p, log_std_p, mean_b, log_std_b).item()
    torch.testing.assert_close(tanh_space.mean(0), torch.full((3,), exact), atol=0.03, rtol=0.0)
    torch.testing.assert_close(kl, torch.full((3,), exact), atol=0.03, rtol=0.0)
    # with the actor's weights, pi_beta scores the actor's own samples with the actor's own log-density
    behavior.load_state_dict(actor.state_dict())
    a, log_p = actor.sample(obs, ids, 100)
    torch.testing.assert_close(behavior.log_prob(obs, ids, a), log_p, atol=2e-3, rtol=0.0)


def test_kl_gradient_reaches_the_actor_not_the_behaviour_model(m):
    torch.manual_seed(0)
    actor, behavior = m.Actor(3, 16, 1), m.BehaviorModel(3, 16, 1)
    kl, _, _ = m.kl_estimate(actor, behavior, torch.randn(5, 17), torch.tensor([0, 1, 2, 0, 1]), 4)
    kl.sum().backward()
    assert all(p.grad is None for p in behavior.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in actor.parameters())


# ---------------------------------------------------------------- the behaviour model
def test_behavior_model_log_likelihood_rises_on_a_small_dataset(m, small_datasets):
    """Real Walker2d states with actions a fixed function of the state, some exactly +-1."""
    _, data = m.load_dataset(small_datasets[0])
    obs = (data["observations"] - data["observations"].mean(0)) / (data["observations"].std(0) + 1e-3)
    rng = np.random.default_rng(0)
    actions = np.clip(1.2 * np.tanh(obs[:, :6]) + 0.05 * rng.normal(size=(len(obs), 6)), -1, 1).astype(np.float32)
    assert (np.abs(actions) == 1).any()
    obs, actions = torch.tensor(obs, dtype=torch.float32), torch.tensor(actions)
    ids = torch.zeros(len(obs), dtype=torch.long)
    torch.manual_seed(0)
    behavior = m.BehaviorModel(3, 64, 2)
    optim = torch.optim.Adam(behavior.parameters(), lr=m.Args().behavior_lr)
    history = []
    for _ in range(300):
        log_likelihood = behavior.log_prob(obs, ids, actions).mean()
        optim.zero_grad()
        (-log_likelihood).backward()
        optim.step()
        history.append(log_likelihood.item())
    assert all(math.isfinite(v) for v in history)
    assert np.mean(history[-10:]) > np.mean(history[:10]) + 3.0, (history[0], history[-1])
    # the log-likelihood is bounded at +-1 (clipped before atanh), not infinite
    edge = torch.ones(4, 6)
    edge[2:] = -1
    assert torch.isfinite(behavior.log_prob(obs[:4], ids[:4], edge)).all()


# ---------------------------------------------------------------- the losses, equation by equation
def brac_setup(m, **args):
    torch.manual_seed(0)
    actor, behavior = m.Actor(3, 16, 1), m.BehaviorModel(3, 16, 1)
    critic, target = m.TwinCritic(3, 16, 1), m.TwinCritic(3, 16, 1)
    with torch.no_grad():  # Q = Q' = 0 everywhere, so y and the losses reduce to their penalties
        for p in [*critic.parameters(), *target.parameters()]:
            p.zero_()
    batch = {
        "obs": torch.randn(3, 8, 17),
        "actions": torch.rand(3, 8, 6) * 2 - 1,
        "next_obs": torch.randn(3, 8, 17),
        "rewards": torch.randn(3, 8),
        "terminals": (torch.arange(8) % 3 == 0).float().expand(3, 8),
        "task_ids": torch.arange(3)[:, None].expand(3, 8),
        "weights": (torch.arange(8) < 5).float().expand(3, 8),
    }
    return actor, critic, target, behavior, batch, m.Args(kl_samples=3, **args)


@pytest.mark.parametrize("penalty_only", [False, True])
def test_brac_losses_implement_the_value_penalty(m, penalty_only):
    actor, critic, target, behavior, batch, args = brac_setup(m, policy_penalty_only=penalty_only)
    torch.manual_seed(5)
    alpha = torch.tensor([0.7, 0.2, 1.5])  # one weight per task
    losses, stats, per_task = m.brac_losses(actor, critic, target, behavior, batch, args, alpha)
    torch.manual_seed(5)  # the same samples: the loss draws pi's actions for s and s' in one call first
    both_obs, both_ids = torch.cat([batch["obs"], batch["next_obs"]], 1), torch.cat([batch["task_ids"]] * 2, 1)
    kl_both = m.kl_estimate(actor, behavior, both_obs, both_ids, 3)[0].detach()
    kl, next_kl = kl_both[:, :8], kl_both[:, 8:]
    w = batch["weights"]

    def mean(x):
        return ((x * w).sum(1) / w.sum(1)).mean()

    # y = r + gamma (1 - d) (Q' - alpha_i D(s')) with Q' = 0, alpha_i of the row's task; BRAC-p: y = r
    penalty = 0.0 if penalty_only else args.gamma * (1 - batch["terminals"]) * alpha[:, None] * next_kl
    y = batch["rewards"] - penalty
    torch.testing.assert_close(losses["critic"], mean(2 * y**2))  # both critics, Q = 0
    torch.testing.assert_close(losses["actor"], mean(alpha[:, None] * kl))  # alpha D(s) - Q, Q = 0, BRAC-v and -p
    log_beta = behavior.log_prob(batch["obs"], batch["task_ids"], batch["actions"]).detach()
    torch.testing.assert_close(losses["behavior"], -mean(log_beta))  # fitted on exactly the weighted batch
    torch.testing.assert_close(per_task["kl"], (kl * w).sum(1) / w.sum(1))
    torch.testing.assert_close(stats["kl"], mean(kl))
    # the gradient of each loss reaches only its own network
    losses["critic"].backward()
    assert all(p.grad is None for p in [*actor.parameters(), *behavior.parameters()])
    losses["behavior"].backward()
    assert all(p.grad is None for p in actor.parameters())
    critic_grads = [p.grad.clone() for p in critic.parameters()]
    losses["actor"].backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(critic.parameters(), critic_grads))
    assert all(p.grad is None for p in target.parameters())


def test_actor_warm_up_drops_the_q_term(m):
    actor, critic, target, behavior, batch, args = brac_setup(m)
    with torch.no_grad():
        critic.biases[-1].fill_(3.0)  # Q = 3 everywhere
    torch.manual_seed(1)
    alpha = torch.ones(3)
    with_q = m.brac_losses(actor, critic, target, behavior, batch, args, alpha)[0]["actor"]
    torch.manual_seed(1)
    warm_up = m.brac_losses(actor, critic, target, behavior, batch, args, alpha, q_weight=0.0)[0]["actor"]
    torch.testing.assert_close(with_q, warm_up - 3.0)


def test_alpha_loss_moves_each_task_alpha_toward_its_target_kl(m):
    log_alpha = torch.zeros(3, requires_grad=True)  # alpha = 1 for every task
    optim = torch.optim.Adam([log_alpha], lr=0.1)
    task_kl = torch.tensor([3.0, 1.0, 1.5])  # above, below and at a target of 1.5 nats
    loss = m.alpha_loss(log_alpha, task_kl, 1.5)
    torch.testing.assert_close(loss, -(log_alpha * (task_kl - 1.5)).sum())
    loss.backward()
    torch.testing.assert_close(log_alpha.grad, torch.tensor([-1.5, 0.5, 0.0]))
    optim.step()
    assert log_alpha[0] > 0 and log_alpha[1] < 0 and log_alpha[2] == 0  # alpha up, down, unchanged


# ---------------------------------------------------------------- the sharing rules with BRAC's critic
def fake_buffer(sizes):
    n = sum(sizes)
    source = np.concatenate([np.full(s, i) for i, s in enumerate(sizes)])
    return {
        "obs": torch.arange(n, dtype=torch.float32)[:, None].expand(n, 17).clone(),
        "next_obs": torch.zeros(n, 17),
        "actions": torch.zeros(n, 6),
        "rewards_all": torch.arange(n * 3, dtype=torch.float32).reshape(n, 3),
        "terminals_all": torch.zeros(n, 3),
        "source": torch.tensor(source),
    }


def test_cds_route_threshold_percentile_and_basic(m):
    q_own = torch.stack([torch.arange(100.0), torch.arange(100.0) * 2])  # task 0: 0..99, task 1: 0..198
    q_candidates = torch.tensor([[89.2, 89.0, 49.5, 9.95, 9.8], [178.3, 178.0, 99.0, 19.85, 19.7]])
    # the p-th percentile of the own Q-hat: p = 10 (9.9, 19.8), 50 (49.5, 99.0), 90 (89.1, 178.2); >= is routed
    assert m.cds_route(q_own, q_candidates, 10.0).tolist() == [[True, True, True, True, False]] * 2
    assert m.cds_route(q_own, q_candidates, 50.0).tolist() == [[True, True, True, False, False]] * 2
    assert m.cds_route(q_own, q_candidates, 90.0).tolist() == [[True, False, False, False, False]] * 2
    # basic: the mean of the own batch (49.5, 99.0), whatever the percentile
    basic = m.cds_route(q_own, torch.tensor([[49.5, 49.4, 0, 0], [99.0, 98.9, 0, 500]]), 10.0, basic=True)
    assert basic.tolist() == [[True, False, False, False], [True, False, False, True]]


def test_conservative_q_is_the_min_of_brac_twin_critics(m):
    torch.manual_seed(0)
    critic = m.TwinCritic(3, 16, 1)
    buf = {"obs": torch.randn(10, 17), "actions": torch.rand(10, 6) * 2 - 1}
    indices = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    ids = torch.arange(3)[:, None].expand(3, 3)
    for shift in (5.0, -5.0):  # Q2 = Q1 + shift: the min is Q1, then Q2
        with torch.no_grad():
            for w, b in zip(critic.weights, critic.biases):  # member 2 := member 1, output shifted
                w[1].copy_(w[0])
                b[1].copy_(b[0])
            critic.biases[-1][1] += shift
        q1, q2 = critic(buf["obs"][indices], ids, buf["actions"][indices])
        torch.testing.assert_close(q2, q1 + shift)
        q_hat = m.conservative_q(critic, buf, indices)
        torch.testing.assert_close(q_hat, torch.minimum(q1, q2))
        assert not q_hat.requires_grad


def test_sample_batch_for_each_share_mode(m):
    sizes = torch.tensor([50, 30, 20])
    starts = torch.cumsum(sizes, 0) - sizes
    buf = fake_buffer([50, 30, 20])

    def critic(obs, task_ids, actions):
        """Penalised Q-hat: Q1 = buffer index, Q2 = index + 1000 for task 0 only: the min is the index."""
        index = obs[..., 0]
        return torch.stack([index, index + 1000 * (task_ids == 0)])

    torch.manual_seed(0)
    batch, stats = m.sample_batch(
        buf, starts, sizes, critic, m.Args(share="none", batch_size=3000, tasks=("run_forward", "run_backward", "jump"))
    )
    assert stats == {} and (batch["weights"] == 1).all()
    for i in range(3):
        rows = batch["obs"][i, :, 0].long()
        assert (buf["source"][rows] == i).all()
        torch.testing.assert_close(batch["rewards"][i], (rows * 3 + i).float())  # relabelled to task i
    batch, stats = m.sample_batch(
        buf, starts, sizes, critic, m.Args(share="all", batch_size=3000, tasks=("run_forward", "run_backward", "jump"))
    )
    for i in range(3):
        rows = batch["obs"][i, :, 0].long()
        assert set(buf["source"][rows].tolist()) == {0, 1, 2}
        torch.testing.assert_close(batch["rewards"][i], (rows * 3 + i).float())
    # the share of each task's batch drawn from each other task's data: that data's share of all the data
    assert stats["batch/jump/from_run_forward"].item() == pytest.approx(0.5, abs=0.03)
    assert stats["batch/run_forward/from_jump"].item() == pytest.approx(0.2, abs=0.03)
    assert len(stats) == 6 and all(key.startswith("batch/") for key in stats)
    batch, stats = m.sample_batch(
        buf,
        starts,
        sizes,
        critic,
        m.Args(
            batch_size=2000,
            cds_candidates=2000,
            cds_threshold_percentile=50.0,
            tasks=("run_forward", "run_backward", "jump"),
        ),
    )
    weights, rows = batch["weights"], batch["obs"][..., 0].long()
    assert (weights[:, :2000] == 1).all()  # the own batch is always trained on
    assert (weights[0, 2000:] == 1).all()  # task 0 (median ~24.5): every candidate (indices >= 50) routed
    assert (weights[2, 2000:] == 0).all()  # task 2 (median ~89.5): none of indices < 80 routed
    assert ((weights[1, 2000:] == 1) == (rows[1, 2000:] >= 80)).all()  # task 1: task 2's routed, task 0's not
    # the CDS paper's "CDS weights": the fraction of src's candidates routed to dst
    assert stats["cds/jump_to_run_backward/routed_fraction"].item() == 1.0
    assert stats["cds/run_forward_to_run_backward/routed_fraction"].item() == 0.0
    assert stats["cds/run_forward/routed_fraction"].item() == 1.0
    # the share of run_backward's training batch (own + routed) that came from each other task
    routed = weights[1, 2000:].sum().item()
    assert 0 < routed < 2000
    assert stats["batch/run_backward/from_jump"].item() == pytest.approx(routed / (2000 + routed))
    assert stats["batch/run_backward/from_run_forward"].item() == 0.0
    assert not [key for key in stats if key.startswith("sharing/")]
    torch.testing.assert_close(batch["rewards"][1], (rows[1] * 3 + 1).float())


# ---------------------------------------------------------------- smoke runs
@pytest.mark.parametrize("share", ["none", "all", "cds"])
def test_smoke_run_reaches_the_updates(m, share, small_datasets, tmp_path):
    out = run_script(
        SCRIPT,
        "--datasets",
        *small_datasets,
        "--share",
        share,
        "--total-steps",
        "40",
        "--eval-freq",
        "40",
        "--checkpoint-freq",
        "20",
        *TINY,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "behaviour warm-up 20/20" in out.stdout and "step 40/40" in out.stdout
    run_dir = tmp_path / "runs" / f"{SCRIPT}__custom__1"
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["finished"] and summary["steps_done"] == 40 and summary["args"]["share"] == share
    for task in TASKS:  # the latest D_KL(pi, pi_beta) of each task, in every evaluation record
        assert math.isfinite(summary["final"][task]["kl"]) and math.isfinite(summary["final"][task]["return"])
        assert summary["final"][task]["alpha"] == 1.0  # fixed at --alpha without --target-kl
    tags = [
        "losses/critic_loss",
        "losses/actor_loss",
        "losses/behavior_loss",
        "losses/kl",
        "losses/q_data",
        "losses/entropy",
        "losses/behavior_log_likelihood",
        "charts/SPS",
        "eval/jump/return",
        "eval/average_return",
        "eval/average_normalized_score",
        "warmup/behavior_log_likelihood",
    ]
    tags += [f"brac/{task}/{key}" for task in TASKS for key in ("kl", "behavior_log_likelihood")]
    tags += [f"brac/{task}/{key}" for task in TASKS for key in ("q_data", "alpha")]
    tags += {
        "none": [],
        "all": ["batch/jump/from_run_forward"],
        "cds": [
            "batch/jump/from_run_forward",
            "cds/run_forward_to_jump/routed_fraction",
            "cds/jump/q_own",
            "cds/jump/q_routed",
            "cds/jump/routed_fraction",
        ],
    }[share]
    for tag in tags:
        assert scalars(run_dir, tag), tag
    assert [s for s, _ in scalars(run_dir, "losses/critic_loss")] == [10, 20, 30, 40]
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    logged = acc.Tags()["scalars"]
    assert not [tag for tag in logged if tag.startswith("sharing/")]  # the old key of three meanings is gone
    assert "losses/kl_alpha_loss" not in logged  # alpha is fixed without --target-kl
    if share == "none":  # no other task's data in any batch
        assert not [tag for tag in logged if tag.startswith(("batch/", "cds/"))]
    if share == "all":
        assert not [tag for tag in logged if tag.startswith("cds/")]
    # every optimiser stepped, and the networks moved away from their initialisation
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 40 and ckpt["warmup"] == {"step": 20} and ckpt["warnings"] == []
    for key, steps in (("actor_optim", 40), ("critic_optim", 40), ("behavior_optim", 60)):
        assert all(s["step"].item() == steps for s in ckpt[key]["state"].values()), key
    torch.manual_seed(1)  # the script's construction order under --seed 1
    fresh = {"actor": m.Actor(3, 32, 2), "critic": m.TwinCritic(3, 32, 2)}
    m.TwinCritic(3, 32, 2)
    fresh["behavior"] = m.BehaviorModel(3, 32, 2)
    for key, net in fresh.items():
        assert all(not torch.equal(net.state_dict()[k], v) for k, v in ckpt[key].items()), key
    assert any(not torch.equal(ckpt["critic"][k], v) for k, v in ckpt["critic_target"].items())
    assert not ckpt["alpha_optim"]["state"]  # alpha is not learned without --target-kl


def test_target_kl_learns_each_task_alpha(small_datasets, tmp_path):
    # a target far below pi's D_KL: every task's alpha must grow from --alpha, once the actor's warm-up is over
    out = run_script(
        SCRIPT,
        "--datasets",
        *small_datasets,
        "--share",
        "cds",
        "--total-steps",
        "40",
        "--eval-freq",
        "20",
        "--target-kl",
        "0.001",
        "--alpha",
        "0.5",
        "--alpha-lr",
        "0.01",
        *TINY,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "runs" / f"{SCRIPT}__custom__1"
    summary = json.load(open(run_dir / "summary.json"))
    for task in TASKS:
        alphas = [e[task]["alpha"] for e in summary["evals"]]
        assert 0.5 < alphas[0] < alphas[1], (task, alphas)
        assert [s for s, _ in scalars(run_dir, f"brac/{task}/alpha")] == [10, 20, 30, 40]
    # the dual loss of alpha, logged once the actor's warm-up is over (step 10 is its last update)
    assert [s for s, _ in scalars(run_dir, "losses/kl_alpha_loss")] == [20, 30, 40]
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    # 40 steps, of which the 10 of the actor's warm-up do not train alpha
    assert [s["step"].item() for s in ckpt["alpha_optim"]["state"].values()] == [30]
    # the evaluation records the alpha of step 40's losses; the checkpoint holds it after step 40's update
    assert (ckpt["log_alpha"].exp() > torch.tensor([summary["final"][t]["alpha"] for t in TASKS])).all()


@pytest.mark.parametrize("extra", [[], ["--target-kl", "0.5"]], ids=["fixed-alpha", "target-kl"])
def test_resume_continues_the_run_exactly(small_datasets, tmp_path, extra):
    flags = ["--datasets", *small_datasets, "--eval-freq", "20", "--checkpoint-freq", "20", *TINY, *extra]
    straight = run_script(SCRIPT, *flags, "--total-steps", "40", "--exp-name", "straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    half = run_script(SCRIPT, *flags, "--total-steps", "20", "--exp-name", "split", cwd=tmp_path)
    assert half.returncode == 0, half.stderr
    rest = run_script(SCRIPT, *flags, "--total-steps", "40", "--exp-name", "split", "--resume", cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr
    assert "resumed split__custom__1 at step 20" in rest.stdout
    assert "behaviour warm-up" not in rest.stdout  # pi_beta's warm-up is not repeated
    a = torch.load(tmp_path / "runs/straight__custom__1/checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "runs/split__custom__1/checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 40 and a["warmup"] == b["warmup"] == {"step": 20}
    for key in ("actor", "critic", "critic_target", "behavior"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=0, atol=0)
    torch.testing.assert_close(b["log_alpha"], a["log_alpha"], rtol=0, atol=0)
    summary = json.load(open(tmp_path / "runs/split__custom__1/summary.json"))
    assert [e["step"] for e in summary["evals"]] == [20, 40]
    # a run is continued with the data-sharing rule it was trained with
    other = run_script(
        SCRIPT, *flags, "--total-steps", "60", "--exp-name", "split", "--resume", "--share", "none", cwd=tmp_path
    )
    assert other.returncode == 2 and "was trained with --share cds, not none" in other.stderr
    assert torch.load(tmp_path / "runs/split__custom__1/checkpoint.pt", weights_only=False)["step"] == 40  # untouched
    if not extra:  # alpha learned from here on starts at --alpha, not at the fixed alpha the run had
        more = run_script(
            SCRIPT,
            *flags,
            "--total-steps",
            "50",
            "--exp-name",
            "split",
            "--resume",
            "--target-kl",
            "0.5",
            "--alpha",
            "0.5",
            cwd=tmp_path,
        )
        assert more.returncode == 0, more.stderr
        for task in TASKS:
            alphas = dict(scalars(tmp_path / "runs/split__custom__1", f"brac/{task}/alpha"))
            assert alphas[40] == 1.0 and alphas[50] == pytest.approx(0.5, abs=0.05), (task, alphas)


def test_over_estimation_is_reported_once_per_task_and_the_checkpoint_before_it_kept(small_datasets, tmp_path):
    flags = ["--datasets", *small_datasets, "--share", "none", "--eval-freq", "20", "--checkpoint-freq", "20", *TINY]
    out = run_script(SCRIPT, *flags, "--total-steps", "20", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "warning" not in out.stdout  # a healthy critic: no warning
    run_dir = tmp_path / "runs" / f"{SCRIPT}__custom__1"
    assert json.load(open(run_dir / "summary.json"))["warnings"] == []
    ckpt_path = run_dir / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    ckpt["critic"]["biases.2"] += 1e4  # a critic that rates everything at about 10^4, far above max r / (1 - gamma)
    torch.save(ckpt, ckpt_path)
    out = run_script(SCRIPT, *flags, "--total-steps", "40", "--resume", cwd=tmp_path)
    assert out.returncode == 0, out.stderr  # the run goes on
    lines = [line for line in out.stdout.splitlines() if line.startswith("warning:")]
    assert len(lines) == 3 and all("step 30: the critic rates" in line and "over-estimates" in line for line in lines)
    summary = json.load(open(run_dir / "summary.json"))
    assert [(w["step"], w["task"]) for w in summary["warnings"]] == [(30, t) for t in TASKS]
    for task in TASKS:  # a copy of the checkpoint written before the warning (step 20's)
        kept = torch.load(run_dir / f"checkpoint_before_{task}_overestimated.pt", weights_only=False)
        assert kept["step"] == 20 and kept["critic"]["biases.2"].min() > 1e3


def test_ctrl_c_in_the_behaviour_warm_up_saves_a_checkpoint_that_resumes(small_datasets, tmp_path):
    flags = ["--datasets", *small_datasets, "--eval-freq", "100000", *TINY]
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, SCRIPT + ".py"),
            *flags,
            "--behavior-warmup-steps",
            "100000",
            "--total-steps",
            "100000",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    for line in proc.stdout:  # wait until the warm-up is under way: its first progress line comes after about 5 s
        if line.startswith("behaviour warm-up "):
            break
    shown = int(line.split()[2].split("/")[0])
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted at behaviour warm-up " in stdout and "checkpoint saved" in stdout
    ckpt = torch.load(tmp_path / f"runs/{SCRIPT}__custom__1/checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 0 and 0 < shown <= ckpt["warmup"]["step"] < 100_000
    done = ckpt["warmup"]["step"] + 5
    out = run_script(
        SCRIPT, *flags, "--behavior-warmup-steps", str(done), "--total-steps", "5", "--resume", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert f"behaviour warm-up {done}/{done}" in out.stdout and "done: 5 steps" in out.stdout
    ckpt = torch.load(tmp_path / f"runs/{SCRIPT}__custom__1/checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 5 and ckpt["warmup"]["step"] == done
    assert all(s["step"].item() == done + 5 for s in ckpt["behavior_optim"]["state"].values())


def test_a_progress_line_comes_before_log_freq_steps(small_datasets, tmp_path):
    """Progress follows wall time: a line about 5 s into training, long before --log-freq steps; Ctrl-C then saves."""
    flags = ["--datasets", *small_datasets, *TINY, "--log-freq", "1000000", "--eval-freq", "1000000"]
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, SCRIPT + ".py"), *flags, "--total-steps", "1000000"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    for line in proc.stdout:
        if line.startswith("step "):
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    shown = int(line.split()[1].split("/")[0])
    assert line.split()[1].endswith("/1000000") and 0 < shown < 1_000_000, line
    assert proc.returncode == 130, stderr
    assert "interrupted at step " in stdout and "checkpoint saved" in stdout
    run_dir = tmp_path / "runs" / f"{SCRIPT}__custom__1"
    assert not scalars(run_dir, "losses/critic_loss")  # no --log-freq step was reached
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert shown <= ckpt["step"] < 1_000_000 and ckpt["warmup"] == {"step": 20}
    total = ckpt["step"] + 3
    out = run_script(SCRIPT, *flags, "--total-steps", str(total), "--resume", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"resumed {SCRIPT}__custom__1 at step {ckpt['step']}" in out.stdout and f"done: {total} steps" in out.stdout
    assert f"step {total}/{total}" in out.stdout  # a progress line at the last step


def test_every_numeric_flag_has_an_interval(m):
    numeric = {f.name for f in dataclasses.fields(m.Args) if f.type in (int, float) or "float | None" in str(f.type)}
    assert numeric == set(m.LIMITS)
    assert not hasattr(m.Args(), "reference")  # the reference returns are read from data/reference.json


# ---------------------------------------------------------------- bad input: one line, non-zero exit
def test_bad_input_gets_one_clear_line(small_datasets, tmp_path):
    cases = [
        (["--datasets", *small_datasets, "--share", "some"], "--share must be none, all or cds, got 'some'"),
        (["--tasks", "run_forward", "fly"], "unknown task 'fly'"),
        (["--datasets", str(tmp_path / "missing.npz"), *small_datasets[1:]], "dataset file not found"),
        (["--tasks", "run_forward", "--datasets", small_datasets[0]], "at least two --tasks"),
        (["--datasets", *small_datasets, "--alpha", "-1"], "--alpha must lie in [0, inf), got -1.0"),
        (["--datasets", *small_datasets, "--target-kl", "0"], "--target-kl must lie in (0, inf), got 0.0"),
        (["--datasets", *small_datasets, "--target-kl", "1", "--alpha", "0"], "--target-kl learns log alpha"),
        (["--cds-percentile", "150"], "--cds-percentile must lie in [0, 100], got 150.0"),
        (["--cds-percentile", "-5"], "--cds-percentile must lie in [0, 100], got -5.0"),
        (["--cds-percentile", "nan"], "--cds-percentile must lie in [0, 100], got nan"),
        (["--cds-threshold-percentile", "-1"], "--cds-threshold-percentile must lie in [0, 100], got -1.0"),
        (["--cds-candidates", "0"], "--cds-candidates must lie in [1, inf), got 0"),
        (["--tau", "0"], "--tau must lie in (0, 1], got 0.0"),
        (["--gamma", "1"], "--gamma must lie in [0, 1), got 1.0"),
        (["--alpha-lr", "0"], "--alpha-lr must lie in (0, inf), got 0.0"),
        (["--behavior-lr", "-1"], "--behavior-lr must lie in (0, inf), got -1.0"),
    ]
    for flags, message in cases:
        out = run_script(SCRIPT, *flags, cwd=tmp_path)
        assert out.returncode == 2, (flags, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (flags, out.stderr)
        assert "Traceback" not in out.stderr
        assert not (tmp_path / "runs").exists(), flags  # refused before anything is created
