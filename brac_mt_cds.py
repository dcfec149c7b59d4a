"""Multi-task BRAC with Conservative Data Sharing (CDS): task i trains on D_i plus the other tasks' transitions whose
value-penalised Q under task i reaches a percentile of task i's own batch (the domain's: the 10th, the mazes' the
90th), relabelled to task i.
BRAC: Wu, Tucker & Nachum (2019), https://arxiv.org/abs/1911.11361. CDS: Yu et al. (2021),
https://arxiv.org/abs/2109.08128. BRAC-v: a behaviour model pi_beta(a|s,i) is fitted by maximum likelihood to the data
each task trains on; the critic's target subtracts alpha KL(pi || pi_beta)(s'), and the actor minimises alpha KL - Q.
`--share none` and `all` give the baselines. One network of each kind for all tasks, fed a task one-hot. Top to
bottom: Args, tasks, networks, the losses, the sharing rule, evaluation, the training loop; below the PLUMBING banner,
the code every script shares.
"""

import contextlib
import ctypes
import functools
import importlib.util
import io
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Annotated

import gymnasium as gym
import mujoco
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

HERE = os.path.dirname(os.path.abspath(__file__))


HINTS = ("the domain's first", "all of the domain's", "the domain's shipped files")  # defaults that follow --domain
FIRST, ALL, SHIPPED = (tyro.conf.arg(help_behavior_hint=f"(default: {hint})") for hint in HINTS)
DOMAINS_P = tyro.conf.arg(help_behavior_hint="(default: the domain's: 90 on the mazes, 10 elsewhere; README)")


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the run goes to runs/<exp_name>__<mixture>__<seed>
    seed: int = 1  # seed of torch, numpy, random and the evaluation environments
    torch_deterministic: bool = True  # deterministic torch algorithms (the same seed on CPU gives the same losses)
    device: str = "auto"  # `auto` (CUDA when present), `cpu` or `cuda`
    domain: str = "mt-walker2d"  # mt-walker2d, maze-medium, maze-large, antmaze-*, dmc-walker, door-drawer (README)
    mixture: Annotated[str, FIRST] = ""  # which shipped data to train on (README, Domains)
    tasks: Annotated[tuple[str, ...], ALL] = ()  # the task names to train and evaluate
    datasets: Annotated[tuple[str, ...], SHIPPED] = ()  # your own .npz files, one per task (data/README.md)
    total_steps: int = 1_000_000  # gradient steps, each on a batch of every task (CDS paper: 1M)
    batch_size: int = 256  # transitions per task per gradient step (CDS paper: 256)
    gamma: float = 0.99  # discount
    tau: float = 5e-3  # Polyak rate of the target critics
    policy_lr: float = 3e-4  # actor learning rate (HCSAC slides; BRAC's code: 3e-4 too)
    q_lr: float = 3e-4  # critic learning rate (as the CQL scripts; BRAC's code: 1e-3)
    hidden_dim: int = 256  # width of every hidden layer
    n_hidden: int = 3  # hidden layers of actor, behaviour model and critics (HCSAC slides: 3x256)
    behavior_lr: float = 5e-4  # behaviour model learning rate (BRAC's code, its behaviour cloning: 5e-4)
    alpha: float = 1.0
    """weight of the divergence D = KL(pi || pi_beta); with --target-kl, every task's starting alpha. BRAC's code: 0.1,
    which let D_KL grow to 7-15 nats here; 3.0 collapsed the critic (benchmark/README.md, Sweep: BRAC's alpha)"""
    target_kl: float | None = None
    """learn each task's alpha by dual gradient descent toward this D_KL, in nats (BRAC's code: train_alpha, off); alpha
    ran away with the value penalty, BRAC-p held 1.5 (benchmark/README.md, Why BRAC over-estimates, and what held it)"""
    alpha_lr: float = 1e-3  # learning rate of log alpha with --target-kl (BRAC's code: 1e-3)
    kl_samples: int = 4  # actions sampled from pi per state to estimate the KL (BRAC's code: 4)
    behavior_warmup_steps: int = 300_000  # steps fitting pi_beta alone first, not in --total-steps (BRAC's code: 300k)
    actor_warmup_steps: int = 20_000  # first steps: the actor minimises alpha D alone, without -Q (BRAC's code: 20k)
    policy_penalty_only: bool = False  # BRAC-p: the penalty in the actor's loss only, not in the target (BRAC paper)
    eval_freq: int = 10_000  # gradient steps between evaluations (one is also run at the end)
    eval_episodes: int = 10  # episodes per task per evaluation, with the mean action
    log_freq: int = 1_000  # gradient steps between TensorBoard scalars (progress lines follow wall time)
    checkpoint_freq: int = 10_000  # gradient steps between checkpoints (also written at the end and on Ctrl-C)
    resume: bool = False  # continue runs/<run_name> from its checkpoint (to a larger --total-steps too)
    bf16: bool = False  # bfloat16 autocast of the network passes (about 1.4x on CPU; benchmark/README.md, Speed)
    compile: bool = False  # torch.compile the losses (slower for BRAC on CPU; benchmark/README.md, Speed)
    share: str = "cds"  # data task i trains on: `cds`, `none` (D_i) or `all` (every D_j); give each its own --exp-name
    cds_threshold_percentile: Annotated[float | None, DOMAINS_P] = None
    """p: route a candidate whose Q-hat reaches the p-th percentile of the own batch's Q-hat (10: what 90% of it
    exceeds). The CDS paper's "top-k percentile" gives no k, and reads as p = 100 - k or p = k (README, deviations)"""
    cds_percentile: float | None = None  # the old flag: --cds-percentile k is --cds-threshold-percentile 100 - k
    cds_basic: bool = False  # CDS (basic): threshold at the mean Q-hat of the own batch (CDS paper's basic variant)
    cds_candidates: int = 256  # candidates drawn from the other tasks per task per step (as many as the own batch)


LIMITS = {  # the interval of every numeric flag, checked before anything is created
    "seed": "[0, 4294967295]", "total_steps": "[1, inf)", "batch_size": "[1, inf)", "gamma": "[0, 1)", "tau": "(0, 1]",
    "policy_lr": "(0, inf)", "q_lr": "(0, inf)", "hidden_dim": "[1, inf)", "n_hidden": "[1, inf)",
    "behavior_lr": "(0, inf)", "alpha": "[0, inf)", "target_kl": "(0, inf)", "alpha_lr": "(0, inf)",
    "kl_samples": "[1, inf)", "behavior_warmup_steps": "[0, inf)", "actor_warmup_steps": "[0, inf)",
    "eval_freq": "[1, inf)", "eval_episodes": "[1, inf)", "log_freq": "[1, inf)", "checkpoint_freq": "[1, inf)",
    "cds_threshold_percentile": "[0, 100]", "cds_percentile": "[0, 100]", "cds_candidates": "[1, inf)",
}  # fmt: skip


# ---- Networks: a tanh-Gaussian actor and behaviour model, and twin critics, fed [normalised obs, task one-hot].
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class Actor(nn.Module):
    def __init__(self, n_tasks, hidden_dim=256, n_hidden=3, obs_dim=17, act_dim=6):
        super().__init__()
        self.n_tasks = n_tasks
        widths = [obs_dim + n_tasks] + [hidden_dim] * n_hidden
        self.trunk = nn.Sequential(*[m for i, o in zip(widths[:-1], widths[1:]) for m in (nn.Linear(i, o), nn.ReLU())])
        self.head = nn.Linear(hidden_dim, 2 * act_dim)

    def forward(self, obs, task_ids):
        """Mean and log-std of the pre-tanh Gaussian."""
        out = self.head(self.trunk(torch.cat([obs, F.one_hot(task_ids, self.n_tasks).float()], -1))).float()
        mean, log_std = out.chunk(2, -1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(self, obs, task_ids, n=None):
        """Reparameterised tanh-Gaussian actions and their log-densities (n samples per row)."""
        mean, log_std = self(obs, task_ids)
        u = mean + log_std.exp() * torch.randn((n, *mean.shape) if n else mean.shape, device=mean.device)
        gauss_log_prob = (-0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        # log pi(a) = log N(u) - sum log(1 - tanh(u)^2), written stably
        log_prob = gauss_log_prob - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)
        return torch.tanh(u), log_prob

    @torch.no_grad()
    def act(self, obs, task_ids):
        """Deterministic evaluation action: tanh of the mean."""
        return torch.tanh(self(obs, task_ids)[0])


class TwinCritic(nn.Module):
    """Q1 and Q2 as one ensemble of two MLPs: one batched matmul per layer evaluates both."""

    def __init__(self, n_tasks, hidden_dim=256, n_hidden=3, obs_dim=17, act_dim=6):
        super().__init__()
        self.n_tasks = n_tasks
        widths = [obs_dim + n_tasks + act_dim] + [hidden_dim] * n_hidden + [1]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialisation, per member
            self.weights.append(nn.Parameter(torch.empty(2, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(2, 1, fan_out).uniform_(-bound, bound)))

    def forward(self, obs, task_ids, actions, detach_params=False):
        """Q1, Q2 of shape (2, *batch). detach_params: gradients reach the actions, not the critic."""
        x = torch.cat([obs, F.one_hot(task_ids, self.n_tasks).float(), actions], -1)
        batch_shape = x.shape[:-1]
        x = x.reshape(1, -1, x.shape[-1]).expand(2, -1, -1)
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            if detach_params:
                w, b = w.detach(), b.detach()
            x = torch.baddbmm(b, x, w)
            if k < len(self.weights) - 1:
                x = F.relu(x)
        return x.float().reshape(2, *batch_shape)


def gaussian_log_prob(u, mean, log_std):
    """log N(u; mean, exp(log_std)^2), summed over the action dimensions."""
    return (-0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


ACTION_EPS = 1e-3  # dataset actions are clipped to [-1 + eps, 1 - eps] before atanh (BRAC's code: CLIP_EPS)


class BehaviorModel(Actor):
    """pi_beta(a|s,i): a tanh-Gaussian like the actor (as in BRAC's code), fitted by plain maximum likelihood. BRAC's
    cloning added a learned entropy bonus; here the log-std floor LOG_STD_MIN alone keeps pi_beta from collapsing."""

    def log_prob(self, obs, task_ids, actions):
        """log pi_beta(a|s,i) of given actions. Dataset actions can be exactly +-1, where atanh is infinite: they are
        clipped to [-1 + ACTION_EPS, 1 - ACTION_EPS] first, as BRAC's cloning did."""
        mean, log_std = self(obs, task_ids)
        a = actions.clamp(-1.0 + ACTION_EPS, 1.0 - ACTION_EPS)
        # log pi_beta(a) = log N(atanh(a)) - sum log(1 - a^2)
        return gaussian_log_prob(torch.atanh(a), mean, log_std) - torch.log1p(-a * a).sum(-1)


# ---- ALGO LOGIC: BRAC-v, behaviour-regularised actor-critic with a value penalty, all tasks and actions in one pass.
def per_task_mean(x, weights):
    """Mean over each task's batch (weights mark the transitions each task trains on), then over tasks."""
    return ((x * weights).sum(-1) / weights.sum(-1).clamp_min(1e-8)).mean()


def task_means(x, weights):
    """Mean over each task's batch, one value per task: (n_tasks, M) -> (n_tasks,)."""
    return (x * weights).sum(-1) / weights.sum(-1).clamp_min(1e-8)


def kl_estimate(actor, behavior, obs, task_ids, n):
    """D(s) = KL(pi(.|s,i) || pi_beta(.|s,i)) from n reparameterised samples a = tanh(u) ~ pi; no gradient reaches
    pi_beta. The shared tanh's Jacobian cancels in log pi(a) - log pi_beta(a), so D compares the Gaussians at u, exact
    even where tanh(u) rounds to +-1 (BRAC's code clipped a). Returns D, u (n, *batch, A) and log pi(tanh(u))."""
    mean, log_std = actor(obs, task_ids)
    with torch.no_grad():
        behavior_mean, behavior_log_std = behavior(obs, task_ids)
    u = mean + log_std.exp() * torch.randn((n, *mean.shape), device=mean.device)
    log_pi_u = gaussian_log_prob(u, mean, log_std)
    # D(s) = E_{a~pi}[log pi(a|s) - log pi_beta(a|s)], the equal tanh Jacobians cancelled
    kl = (log_pi_u - gaussian_log_prob(u, behavior_mean, behavior_log_std)).mean(0)
    # log pi(a) = log N(u) - sum log(1 - tanh(u)^2), written stably
    log_pi = log_pi_u - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)
    return kl, u, log_pi


def brac_losses(actor, critic, critic_target, behavior, batch, args, alpha, q_weight=1.0):
    """Actor, critic and behaviour-model losses of one gradient step. batch: gather's tensors (n_tasks, M, ...), weights
    1 where task i trains on the transition; alpha: (n_tasks,) divergence weights, no gradient; q_weight: 0 in the
    actor's warm-up. No SAC entropy term, as in BRAC's code: alpha D = alpha E[log pi - log pi_beta] already rewards
    pi's entropy. Returns (losses, stats, per-task stats)."""
    obs, actions, next_obs, task_ids, weights = map(batch.get, ("obs", "actions", "next_obs", "task_ids", "weights"))
    m = obs.shape[1]
    with torch.autocast(obs.device.type, dtype=torch.bfloat16, enabled=args.bf16):
        # one actor pass for s and s': n actions from pi(.|s) and from pi(.|s'), D(s) and D(s')
        both_obs, both_ids = torch.cat([obs, next_obs], 1), torch.cat([task_ids, task_ids], 1)
        kl_both, u, log_pi = kl_estimate(actor, behavior, both_obs, both_ids, args.kl_samples)  # (T, 2M), (n, T, 2M, A)
        kl, next_kl = kl_both[:, :m], kl_both[:, m:].detach()  # D(s) with gradient, D(s')
        new_actions = torch.tanh(u[0, :, :m])  # a ~ pi(.|s), with gradient
        next_actions = torch.tanh(u[0, :, m:]).detach()  # a' ~ pi(.|s')
        alpha = alpha[task_ids]  # (T, M): the weight of the task each row trains

        # actor: min_pi E[alpha D(s) - min_k Q_k(s, a)]  (BRAC-v and BRAC-p alike)
        q_new = critic(obs, task_ids, new_actions, detach_params=True).min(0).values
        actor_loss = per_task_mean(alpha * kl - q_weight * q_new, weights)

        # TD target: y = r + gamma (1 - d) (min_k Q'_k(s', a') - alpha D(s'))  (BRAC-p: without alpha D)
        with torch.no_grad():
            next_q = critic_target(next_obs, task_ids, next_actions).min(0).values
            if not args.policy_penalty_only:
                next_q = next_q - alpha * next_kl
            target = batch["rewards"] + args.gamma * (1.0 - batch["terminals"]) * next_q
        q_data = critic(obs, task_ids, actions)  # (2, T, M)

        # behaviour model: max_beta E_{(s, a) ~ the data task i trains on}[log pi_beta(a|s, i)]
        behavior_log_prob = behavior.log_prob(obs, task_ids, actions)

    critic_loss = per_task_mean(((q_data - target) ** 2).sum(0), weights)  # both critics
    behavior_loss = -per_task_mean(behavior_log_prob, weights)
    losses = {"critic": critic_loss, "actor": actor_loss, "behavior": behavior_loss}
    stats = {"q_data": per_task_mean(q_data.mean(0), weights), "kl": per_task_mean(kl, weights),
             "entropy": -per_task_mean(log_pi[0, :, :m], weights),
             "behavior_log_likelihood": -behavior_loss}  # fmt: skip
    per_task = {"kl": task_means(kl, weights), "q_data": task_means(q_data.mean(0), weights),
                "behavior_log_likelihood": task_means(behavior_log_prob, weights)}  # fmt: skip
    return losses, {k: v.detach() for k, v in stats.items()}, {k: v.detach() for k, v in per_task.items()}


def alpha_loss(log_alpha, task_kl, target_kl):
    """--target-kl: dual gradient descent on alpha, as BRAC's train_alpha (loss -alpha (D - target)): each task's alpha
    grows while its D_KL is above the target and shrinks below it. On log alpha, so that alpha stays positive (BRAC's
    code clipped alpha to [0, 500]). log_alpha: (n_tasks,) with gradient; task_kl: (n_tasks,) each task's D_KL."""
    return -(log_alpha * (task_kl - target_kl)).sum()


def gather(buf, indices, weights):
    """Batch tensors (n_tasks, M, ...); row i reads rewards and terminals relabelled to task i."""
    task_ids = torch.arange(indices.shape[0], device=indices.device)[:, None].expand_as(indices)
    return {
        "obs": buf["obs"][indices], "actions": buf["actions"][indices], "next_obs": buf["next_obs"][indices],
        "rewards": buf["rewards_all"][indices, task_ids], "terminals": buf["terminals_all"][indices, task_ids],
        "task_ids": task_ids, "weights": weights,
    }  # fmt: skip


def sample_own(starts, sizes, batch_size):
    """(n_tasks, batch_size) buffer indices: row i uniform over task i's own dataset D_i."""
    u = torch.rand(len(sizes), batch_size, dtype=torch.float64, device=sizes.device)
    return starts[:, None] + (u * sizes[:, None]).long()


def sample_others(starts, sizes, batch_size):
    """(n_tasks, batch_size) buffer indices: row i uniform over every dataset but task i's own."""
    u = torch.rand(len(sizes), batch_size, dtype=torch.float64, device=sizes.device)
    indices = (u * (sizes.sum() - sizes)[:, None]).long()  # an index into the union without D_i ...
    return indices + sizes[:, None] * (indices >= starts[:, None])  # ... shifted past D_i


# ---- ALGO LOGIC: the sharing rule. CDS: route a transition of task j to task i when its conservative Q-value under
# ---- task i is high compared with task i's own data; BRAC's Q is conservative through its value penalty.
@torch.no_grad()
def conservative_q(critic, buf, indices):
    """Q-hat(s, a, i) = min_k Q_k(s, a, i), no gradient; row i of `indices` is scored under task i."""
    task_ids = torch.arange(indices.shape[0], device=indices.device)[:, None].expand_as(indices)
    return critic(buf["obs"][indices], task_ids, buf["actions"][indices]).min(0).values


def cds_route(q_own, q_candidates, percentile, basic=False):
    """CDS weights w = 1[Q-hat(s, a, i) - threshold_i >= 0], threshold_i over task i's own batch: the `percentile`-th
    percentile of its Q-hat (10: the value 90% of it exceeds), or with `basic` its mean. (T, M) -> bool (T, M')."""
    threshold = q_own.mean(1) if basic else torch.quantile(q_own, percentile / 100.0, dim=1)
    return q_candidates >= threshold[:, None]


def threshold_rule(args):
    """The run's threshold: --cds-basic (the mean), --cds-threshold-percentile p, the old --cds-percentile k (k of the
    paper's "top-k percentile": p = 100 - k, with a notice), or else the domain's p, from its record. Printed."""
    if args.cds_percentile is not None:
        args.cds_threshold_percentile = 100.0 - args.cds_percentile
        print(f"note: --cds-percentile {args.cds_percentile:g} is now --cds-threshold-percentile "
              f"{args.cds_threshold_percentile:g} (the same threshold)")  # fmt: skip
    origin = f" ({args.domain}'s default)" if args.cds_threshold_percentile is None else ""
    if args.cds_threshold_percentile is None:
        args.cds_threshold_percentile = DOMAINS[args.domain].cds_threshold_percentile
    rule = "the mean" if args.cds_basic else f"the {args.cds_threshold_percentile:g}th percentile"
    print(f"CDS threshold: {rule} of each own batch's Q-hat{origin}")


def drop_unrouted(candidates, routed):
    """Fewer weight-zero rows to compute: each row keeps its routed candidates first, and the columns past the
    largest routed count (unrouted for every task) are dropped."""
    order = torch.argsort((~routed).to(torch.int8), dim=1, stable=True)
    keep = order[:, : int(routed.sum(1).max())]
    return candidates.gather(1, keep), routed.gather(1, keep)


def batch_sources(source, weights, tasks):
    """{'batch/<dst>/from_<src>': the share of dst's batch, by training weight, drawn from src's dataset}."""
    share = (weights[..., None] * F.one_hot(source, len(tasks))).sum(1) / weights.sum(1, keepdim=True).clamp_min(1e-8)
    return {f"batch/{d}/from_{s}": share[i, j] for i, d in enumerate(tasks) for j, s in enumerate(tasks) if i != j}


def sample_none(buf, starts, sizes, args):
    """No sharing: each task's batch comes from its own data. Returns (batch, sharing stats)."""
    indices = sample_own(starts, sizes, args.batch_size)
    return gather(buf, indices, torch.ones(indices.shape, device=indices.device)), {}


def sample_all(buf, starts, sizes, args):
    """Share all: each task's batch is uniform over all transitions. Returns (batch, sharing stats)."""
    indices = (torch.rand(len(sizes), args.batch_size, dtype=torch.float64, device=sizes.device) * sizes.sum()).long()
    weights = torch.ones(indices.shape, device=indices.device)
    return gather(buf, indices, weights), batch_sources(buf["source"][indices], weights, args.tasks)


def sample_batch(buf, starts, sizes, critic, args):
    """CDS: the own batch and the candidates routed to it (--share none, all: the baselines). Returns (batch, stats)."""
    if args.share != "cds":
        return (sample_none if args.share == "none" else sample_all)(buf, starts, sizes, args)
    own = sample_own(starts, sizes, args.batch_size)
    candidates = sample_others(starts, sizes, args.cds_candidates)
    q_own, q_candidates = conservative_q(critic, buf, own), conservative_q(critic, buf, candidates)
    routed = cds_route(q_own, q_candidates, args.cds_threshold_percentile, args.cds_basic)
    source, stats = buf["source"][candidates], {}
    for i, dst in enumerate(args.tasks):
        for j, src in enumerate(args.tasks):
            if i != j:  # the paper's "CDS weight": the fraction of src's candidates routed to dst
                is_src = (source[i] == j).float()
                stats[f"cds/{src}_to_{dst}/routed_fraction"] = (routed[i] * is_src).sum() / is_src.sum().clamp_min(1)
        stats[f"cds/{dst}/q_own"] = q_own[i].mean()
        stats[f"cds/{dst}/q_routed"] = (q_candidates[i] * routed[i]).sum() / routed[i].sum()  # NaN: none routed
        stats[f"cds/{dst}/routed_fraction"] = routed[i].float().mean()
    kept, kept_routed = drop_unrouted(candidates, routed)  # same losses, fewer rows to compute
    indices = torch.cat([own, kept], 1)
    weights = torch.cat([torch.ones(own.shape, device=own.device), kept_routed.float()], 1)
    return gather(buf, indices, weights), stats | batch_sources(buf["source"][indices], weights, args.tasks)


# ---- Evaluation: every task's episodes stepped together, one actor pass per step for all of them.
def evaluate(actor, domain, tasks, episodes, obs_mean, obs_std, seed, device):
    """Mean-action returns (in a maze: 1 for a success, else 0): {task: array of `episodes` returns}."""
    envs = [(i, DOMAINS[domain].make_env(task)) for i, task in enumerate(tasks) for _ in range(episodes)]
    obs = np.stack([env.reset(seed=seed + k)[0] for k, (_, env) in enumerate(envs)])
    returns, done = np.zeros(len(envs)), np.zeros(len(envs), bool)
    task_ids = torch.tensor([i for i, _ in envs], device=device)
    while not done.all():
        norm_obs = torch.as_tensor((obs - obs_mean) / obs_std, dtype=torch.float32, device=device)
        actions = actor.act(norm_obs, task_ids).float().cpu().numpy()
        for k, (_, env) in enumerate(envs):
            if done[k]:
                continue
            obs[k], reward, terminated, truncated, _ = env.step(actions[k])
            returns[k] += reward
            done[k] = terminated or truncated
    for _, env in envs:
        env.close()
    return {task: returns[i * episodes : (i + 1) * episodes] for i, task in enumerate(tasks)}


def warn_over_estimation(run, q_data, ceilings, warnings):
    """Once per task: the critic rates the task's data above any value its targets can build; BRAC's value penalty
    does not stop it extrapolating upward at actions the data lacks (benchmark/README.md, BRAC no sharing over-estimated
    on one seed in four). The run goes on; the checkpoint written before this step is copied aside."""
    for task, q, ceiling in zip(run.args.tasks, q_data.tolist(), ceilings):
        if q <= ceiling or any(w["task"] == task for w in warnings):
            continue
        kept = run.ckpt_path.replace(".pt", f"_before_{task}_overestimated.pt")
        if os.path.exists(run.ckpt_path):
            shutil.copyfile(run.ckpt_path, kept)
        message = (
            f"step {run.step}: the critic rates {task}'s data at Q {q:.0f}, above any value its targets can build from "
            f"the data's rewards (max r / (1 - gamma) = {ceiling:.0f}): it over-estimates, and the returns that follow "
            f"are not to be trusted; the last checkpoint before this is kept in {kept}"
        )
        print(f"warning: {message}", flush=True)
        warnings.append({"step": run.step, "task": task, "message": message})


def fit_behavior_model(run, behavior, behavior_optim, buf, starts, sizes, warmup, args):
    """BRAC's warm-up: pi_beta alone for --behavior-warmup-steps, before the actor-critic starts, on the union with
    --share all, else on D_i (CDS routes nothing before its critic learns). warmup["step"] counts its steps."""
    sample = sample_all if args.share == "all" else sample_none
    while warmup["step"] < args.behavior_warmup_steps:
        batch, _ = sample(buf, starts, sizes, args)
        with torch.autocast(buf["obs"].device.type, dtype=torch.bfloat16, enabled=args.bf16):
            # max_beta E_{(s, a) ~ D_i}[log pi_beta(a|s, i)]
            log_prob = behavior.log_prob(batch["obs"], batch["task_ids"], batch["actions"])
            log_likelihood = per_task_mean(log_prob, batch["weights"])
        run.watch({"behavior_log_likelihood": log_likelihood})
        behavior_optim.zero_grad(set_to_none=True)
        (-log_likelihood).backward()
        behavior_optim.step()
        warmup["step"] += 1
        step, done = warmup["step"], warmup["step"] == args.behavior_warmup_steps
        if step % args.log_freq == 0 or step % args.checkpoint_freq == 0 or done:  # a NaN stops here, unsaved
            run.check_finite("the behaviour model diverged (its log-likelihood is NaN or inf)")
        if step % args.log_freq == 0 or done:
            run.writer.add_scalar("warmup/behavior_log_likelihood", log_likelihood.item(), step)
        if step % args.checkpoint_freq == 0 or done:
            run.save()
        describe = lambda: f"log-likelihood {log_likelihood.item():.2f}"
        run.end_step(describe, step=step, total=args.behavior_warmup_steps, label="behaviour warm-up")
    run.log_time, run.progress_step = time.time(), None  # the actor-critic's SPS and progress lines start afresh


def describe_step(losses, stats, alpha, learned):
    """The progress line's middle: critic loss, Q of the data, D_KL, and each task's alpha where it is learned."""
    line = f"critic {losses['critic'].item():.2f} | Q(data) {stats['q_data'].item():.1f} | KL {stats['kl'].item():.2f}"
    return line + (f" | alpha {' '.join(f'{a:.2f}' for a in alpha.tolist())}" if learned else "")


# ---- The training loop: fit pi_beta; then sample, losses, one step of every optimiser, targets, log, evaluate, save.
def main(args: Args):
    device, buf, run_info = setup(args, LIMITS)
    if args.share not in ("none", "all", "cds"):
        fail(f"--share must be none, all or cds, got {args.share!r}")
    if args.share == "cds":
        threshold_rule(args)
    if args.target_kl is not None and args.alpha == 0:
        fail("--target-kl learns log alpha, starting from --alpha: give it an --alpha above 0")
    if len(args.tasks) < 2 and args.share == "cds":
        fail("CDS shares data between tasks: give it at least two --tasks (or --share none)")
    n_tasks, sizes, domain = len(args.tasks), buf["sizes"], DOMAINS[args.domain]
    dims = (domain.obs_dim, domain.act_dim)  # the domain's observation and action sizes
    starts = torch.cumsum(sizes, 0) - sizes
    # the targets are built from the data's rewards only, so no fixed point rates the data above max r / (1 - gamma)
    q_ceilings = (buf["rewards_all"].max(0).values / (1.0 - args.gamma)).tolist()
    actor = Actor(n_tasks, args.hidden_dim, args.n_hidden, *dims).to(device)
    critic = TwinCritic(n_tasks, args.hidden_dim, args.n_hidden, *dims).to(device)
    critic_target = TwinCritic(n_tasks, args.hidden_dim, args.n_hidden, *dims).to(device)
    critic_target.load_state_dict(critic.state_dict())
    behavior = BehaviorModel(n_tasks, args.hidden_dim, args.n_hidden, *dims).to(device)
    # alpha, one per task: --alpha, or learned toward --target-kl by dual gradient descent on log alpha
    log_alpha = torch.tensor([args.alpha] * n_tasks, device=device).log().requires_grad_(args.target_kl is not None)
    actor_optim = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    critic_optim = torch.optim.Adam(critic.parameters(), lr=args.q_lr)
    behavior_optim = torch.optim.Adam(behavior.parameters(), lr=args.behavior_lr)
    alpha_optim = torch.optim.Adam([log_alpha], lr=args.alpha_lr)
    optims, warmup, warnings = (actor_optim, critic_optim, behavior_optim, alpha_optim), {"step": 0}, []
    run = Run(args, device, run_info, args.total_steps, state=dict(
        actor=actor, critic=critic, critic_target=critic_target, behavior=behavior, actor_optim=actor_optim,
        critic_optim=critic_optim, behavior_optim=behavior_optim, log_alpha=log_alpha, alpha_optim=alpha_optim,
        warmup=warmup, warnings=warnings,
    ), summary=("warnings",))  # fmt: skip
    if run.saved_args and run.saved_args["share"] != args.share:  # a run goes on with the sharing rule it began with
        fail(f"--resume: {run.dir} was trained with --share {run.saved_args['share']}, not {args.share}")
    saved = run.saved_args.get("cds_threshold_percentile", args.cds_threshold_percentile)
    if saved != args.cds_threshold_percentile:  # a run goes on with the threshold it began with
        fail(f"--resume: {run.dir} was trained at --cds-threshold-percentile {saved:g}; pass it to continue")
    if run.saved_args and (args.target_kl is None or run.saved_args["target_kl"] is None):
        with torch.no_grad():  # alpha goes on only where it was learned and still is; else it restarts at --alpha
            log_alpha.copy_(torch.full_like(log_alpha, args.alpha).log())
    fit_behavior_model(run, behavior, behavior_optim, buf, starts, sizes, warmup, args)
    loss_fn = torch.compile(brac_losses) if args.compile else brac_losses

    while run.step < args.total_steps:
        batch, sharing = sample_batch(buf, starts, sizes, critic, args)
        q_weight = float(run.step >= args.actor_warmup_steps)  # BRAC's warm start: the actor ignores Q at first
        alpha = log_alpha.detach().exp()
        losses, stats, per_task = loss_fn(actor, critic, critic_target, behavior, batch, args, alpha, q_weight)
        if args.target_kl is not None and q_weight > 0:  # not in the actor's warm-up, where alpha could only shrink
            losses["kl_alpha"] = alpha_loss(log_alpha, per_task["kl"], args.target_kl)
        run.watch(losses)
        # One backward for all the losses is correct because each reaches only its own parameters: the actor sees the
        # critic through detach_params, and pi_beta under no_grad inside kl_estimate; the TD target is built under
        # no_grad from detached next actions and D(s'); the behaviour model's loss reads only the data's actions;
        # alpha's loss reads D_KL detached, and the other losses read alpha detached.
        for optim in optims:
            optim.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        for optim in optims:  # (alpha has no gradient, and so no step, without --target-kl or in the actor's warm-up)
            optim.step()
        with torch.no_grad():  # target critics: theta' <- (1 - tau) theta' + tau theta
            for p, tp in zip(critic.parameters(), critic_target.parameters()):
                tp.lerp_(p, args.tau)
        run.step += 1

        if run.due(args.log_freq):  # per task: D_KL, Q of its data, pi_beta's log-likelihood (the paper's table), alpha
            per_task["alpha"] = alpha
            brac = {f"brac/{t}/{k}": v[i] for k, v in per_task.items() for i, t in enumerate(args.tasks)}
            run.log(losses, stats, brac, sharing)
            warn_over_estimation(run, per_task["q_data"], q_ceilings, warnings)
        if run.due(args.eval_freq):
            run.evaluate(actor, per_task={"kl": per_task["kl"].tolist(), "alpha": alpha.tolist()})
        if run.due(args.checkpoint_freq):
            run.save()
        run.end_step(lambda: describe_step(losses, stats, alpha, args.target_kl is not None))
    run.finish()


# ==== DOMAINS, identical in every script and pinned by tests/test_parity.py: one record per benchmark. The method,
# ==== the evaluation and the plumbing read a domain only through its record (README, Domains). =====================
@dataclass(frozen=True)
class Domain:
    tasks: tuple[str, ...]  # task names, in the order of the networks' task ids
    obs_dim: int  # observation size (and act_dim, the action size; every action lies in [-1, 1])
    act_dim: int
    mixtures: dict  # mixture: one shipped file per task, data/<data_dir>/<name>.npz; the first is the default
    data_dir: str  # the shipped files' folder under data/, with reference.json (random and expert scores)
    fields: tuple[str, ...]  # the per-transition fields the relabelling reads beside actions and s' (data/README.md)
    make_env: Callable  # task -> its Gymnasium environment: that task's reward and episode end
    relabel: Callable  # (data, tasks) -> rewards, terminals: every transition under every task, (N, len(tasks))
    success: bool  # an episode's return is its success, 0 or 1 (else a return to normalise)
    run_prefix: str  # run folders are runs/<exp_name>__<run_prefix><mixture>__<seed>
    make_data: str  # the command that writes the domain's files (shipped, except AntMaze's: see the README)
    cds_threshold_percentile: float = 10.0  # CDS's default threshold here: the p-th percentile of own Q-hat (README)


# ---- MT-Walker2d: three reward functions on one walker (the CDS paper's locomotion tasks); x_velocity is stored.
WALKER_TASKS = ("run_forward", "run_backward", "jump")
INIT_HEIGHT = 1.25  # h0: Walker2d's initial torso height


def task_terminals(task, next_obs):
    """Terminal flag of `task` for transitions ending in next_obs (17-dim Walker2d-v5 obs)."""
    h, angle = next_obs[..., 0], next_obs[..., 1]
    upright = (angle > -1.0) & (angle < 1.0)
    if task == "jump":  # jump: healthy while h > 0.8 (no upper bound) and upright
        return ~((h > 0.8) & upright)
    return ~((h > 0.8) & (h < 2.0) & upright)  # running: 0.8 < h < 2 and upright


def task_rewards(task, actions, next_obs, x_velocity):
    """Reward of `task`; the +1 healthy bonus is paid only when s' is healthy (Walker2d-v5)."""
    healthy = 1.0 - task_terminals(task, next_obs).astype(np.float32)
    ctrl_cost = 1e-3 * np.square(actions).sum(-1)
    if task == "run_forward":  # r = 1 + v - 0.001|a|^2
        return healthy + x_velocity - ctrl_cost
    if task == "run_backward":  # r = 1 - v - 0.001|a|^2
        return healthy - x_velocity - ctrl_cost
    if task == "jump":  # r = 1 + 10 (h - h0) - |v| - 0.001|a|^2
        return healthy + 10.0 * (next_obs[..., 0] - INIT_HEIGHT) - np.abs(x_velocity) - ctrl_cost
    raise ValueError(f"unknown task {task!r}; choose from {', '.join(WALKER_TASKS)}")


class JumpReward(gym.Wrapper):
    """Walker2d-v5 with the jump reward: 1 + 10 (h - h0) - |v| - 0.001|a|^2."""

    def step(self, action):
        obs, _, terminated, truncated, info = self.env.step(action)
        reward = info["reward_survive"] + 10.0 * (obs[0] - INIT_HEIGHT) - abs(info["x_velocity"]) + info["reward_ctrl"]
        return obs, reward, terminated, truncated, info


def make_env(task):
    """Gymnasium Walker2d-v5 whose rewards and terminations are those of `task`."""
    if task == "run_forward":
        return gym.make("Walker2d-v5")
    if task == "run_backward":
        return gym.make("Walker2d-v5", forward_reward_weight=-1.0)
    if task == "jump":
        return JumpReward(gym.make("Walker2d-v5", forward_reward_weight=0.0, healthy_z_range=(0.8, float("inf"))))
    raise ValueError(f"unknown task {task!r}; choose from {', '.join(WALKER_TASKS)}")


def walker_relabel(data, tasks):
    actions, next_obs, x_velocity = data["actions"], data["next_observations"], data["x_velocity"]
    rewards = np.stack([task_rewards(t, actions, next_obs, x_velocity) for t in tasks], 1).astype(np.float32)
    return rewards, np.stack([task_terminals(t, next_obs) for t in tasks], 1)


DOMAINS = {"mt-walker2d": Domain(WALKER_TASKS, 17, 6, {
    "imbalanced": ("run_forward_medium_replay", "run_backward_medium", "jump_expert"),
    "all-medium": ("run_forward_medium", "run_backward_medium", "jump_medium"),
}, "", ("x_velocity",), make_env, walker_relabel, False, "", "python collect_datasets.py")}  # fmt: skip


# ---- Mazes: the CDS paper's AntMaze protocol on Gymnasium-Robotics' mazes; a goal cell of its maps per task. The
# ---- point robot's data is made here and shipped; the ant's is D4RL's, from Minari, converted by collect_maze.py.
MAZE_START, GOAL_RADIUS = (1, 1), 0.45  # every episode starts in this cell (D4RL's AntMaze); the success distance
MEDIUM_GOALS, LARGE_GOALS = ((2, 6), (5, 1), (6, 5)), ((1, 6), (3, 5), (3, 10), (5, 2), (7, 4), (7, 6), (7, 9))
MAZES = {  # domain: (environment, map size in cells (rows, cols), one goal cell per task, a cell's size)
    "maze-medium": ("PointMaze_Medium-v3", (8, 8), MEDIUM_GOALS, 1.0),
    "maze-large": ("PointMaze_Large-v3", (9, 12), LARGE_GOALS, 1.0),
    # v4: the version whose dynamics match D4RL's AntMaze data (v5 differs); its maps' goal cells are ours
    "antmaze-medium": ("AntMaze_Medium_Diverse_GR-v4", (8, 8), MEDIUM_GOALS, 4.0),
    "antmaze-large": ("AntMaze_Large_Diverse_GR-v4", (9, 12), LARGE_GOALS, 4.0),
}


def goal_xy(domain, task):
    """Centre (x, y) of the task's goal cell ("goal_<k>"), as Gymnasium-Robotics places cells."""
    _, (rows, cols), goals, size = MAZES[domain]
    row, col = goals[int(task[5:])]
    return size * np.array([col + 0.5 - cols / 2, rows / 2 - row - 0.5])


class FixedGoalMaze(gym.Wrapper):
    """A maze, goal fixed at its cell's centre, start in MAZE_START +- a quarter cell, reward 1 at the goal. obs:
    PointMaze's (x, y, vx, vy); the ant's 27 numbers leave out its (x, y), put first (D4RL's AntMaze observation)."""

    def __init__(self, env, goal_cell, goal):
        super().__init__(env)
        self.goal_cell, self.goal = np.array(goal_cell), goal
        self.ant = env.observation_space["observation"].shape == (27,)
        obs_space = env.observation_space["observation"]
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (29,)) if self.ant else obs_space

    def observe(self, obs):
        return np.concatenate([obs["achieved_goal"], obs["observation"]]) if self.ant else obs["observation"]

    def reset(self, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options={"goal_cell": self.goal_cell, "reset_cell": np.array(MAZE_START)})
        self.env.unwrapped.goal = self.goal.copy()  # the goal without the environment's position noise
        return self.observe(obs), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self.observe(obs), reward, terminated, truncated, info


def make_maze_env(domain, task):
    """The task's maze: sparse reward, terminal on success, truncated at the registered limit (PointMaze 600 / 800
    steps, AntMaze 1,000)."""
    with contextlib.redirect_stderr(io.StringIO()):  # the package prints a notice about other environments on import
        import gymnasium_robotics
    gym.register_envs(gymnasium_robotics)
    env_id, _, goals, _ = MAZES[domain]
    with warnings.catch_warnings():  # AntMaze v4 is not the newest version: it is the one the data was recorded in
        warnings.simplefilter("ignore")
        env = gym.make(env_id, continuing_task=False)
    os.remove(env.unwrapped.tmp_xml_file_path)  # loaded; Gymnasium-Robotics leaves each maze's XML in the temp folder
    return FixedGoalMaze(env, goals[int(task[5:])], goal_xy(domain, task))


def maze_relabel(domain, data, tasks):
    """Rewards = terminals of every task: 1 where s' lies within GOAL_RADIUS of the task's goal. (N, len(tasks))."""
    goals = np.stack([goal_xy(domain, t) for t in tasks])
    reached = np.linalg.norm(data["next_observations"][:, None, :2] - goals[None], axis=-1) <= GOAL_RADIUS
    return reached.astype(np.float32), reached


for maze, (_, _, goals, size) in MAZES.items():  # task goal_k: reach goal cell k; data/<maze>/<mixture>_<task>.npz
    tasks, (obs_dim, act_dim) = tuple(f"goal_{k}" for k in range(len(goals))), (4, 2) if size == 1 else (29, 8)
    DOMAINS[maze] = Domain(tasks, obs_dim, act_dim, {m: tuple(f"{m}_{t}" for t in tasks) for m in ("undirected",
                           "directed")}, maze, (), functools.partial(make_maze_env, maze),
                           functools.partial(maze_relabel, maze), True, maze + "-",
                           f"python collect_maze.py --domains {maze}", cds_threshold_percentile=90.0)  # fmt: skip


# ---- dm-control's walker (the HCSAC project's benchmark): walk and run, one body; the reward's speed is stored.
DMC_SPEEDS, STAND_HEIGHT = {"walk": 1.0, "run": 8.0}, 1.2  # dm-control's walker: target speeds, standing height


def make_dmc_env(task):
    """dm-control's walker-<task> (walk: speed 1, run: speed 8) through Shimmy: 1,000 steps, no terminals. obs, 24
    numbers flattened: obs[0] the torso's height, obs[1:15] each body's xx and xz rotation entries (obs[1], the torso's
    xx, is its zz, the reward's uprightness: the walker turns only about y), obs[15:] velocities."""
    try:
        with warnings.catch_warnings():  # dm-control warns when no display is present for rendering
            warnings.simplefilter("ignore")
            import shimmy
    except ImportError:
        raise ImportError(
            "dmc-walker needs dm-control and Shimmy: pip install dm-control 'shimmy[dm-control]'"
        ) from None
    gym.register_envs(shimmy)
    return gym.wrappers.FlattenObservation(gym.make(f"dm_control/walker-{task}-v0"))


def dmc_relabel(data, tasks):
    """dm-control's PlanarWalker.get_reward written out: standing x (5 moving + 1) / 6, the speed being the stored
    x-speed of the torso's subtree centre of mass at s'. Its `tolerance` is 1 inside the bounds and falls off with the
    distance d beyond them, in units of the margin: exp(-d^2 ln 10) (Gaussian, 0.1 at the margin) for the torso's
    height, max(0, 1 - d / 2) (linear, 0.5 at the margin) for the speed."""
    next_obs, speed = data["next_observations"].astype(np.float64), data["horizontal_velocity"].astype(np.float64)
    d_height = np.maximum(STAND_HEIGHT - next_obs[:, 0], 0.0) / (STAND_HEIGHT / 2)
    standing = (3 * np.exp(-(d_height**2) * np.log(10.0)) + (1 + next_obs[:, 1]) / 2) / 4  # obs[1]: uprightness
    rewards = []
    for task in tasks:
        d_speed = np.maximum(DMC_SPEEDS[task] - speed, 0.0) / (DMC_SPEEDS[task] / 2)
        rewards.append(standing * (5 * np.maximum(1 - d_speed / 2, 0.0) + 1) / 6)
    rewards = np.stack(rewards, 1).astype(np.float32)
    return rewards, np.zeros(rewards.shape, bool)  # no terminals: every episode runs 1,000 steps


DOMAINS["dmc-walker"] = Domain(tuple(DMC_SPEEDS), 24, 6, {
    m: tuple(f"{t}_{m.replace('-', '_')}" for t in DMC_SPEEDS) for m in ("medium", "medium-replay")
}, "dmc-walker", ("horizontal_velocity",), make_dmc_env, dmc_relabel, False, "dmc-walker-",
 "python collect_datasets.py --domain dmc-walker")  # fmt: skip


# ---- Door and drawer: the CDS paper's manipulation tasks, Meta-World's Sawyer with both objects in one scene, built
# ---- from Meta-World 3.0.0's model files. obs: hand xyz, gripper opening, door and drawer handle xyz, hinge, slide.
DD_TASKS, DD_STEPS = ("door_open", "door_close", "drawer_open", "drawer_close"), 300  # the episode limit (README)
DOOR, DRAWER = np.array([0.2, 0.9, 0.15]), np.array([-0.3, 0.9, 0.0])  # the objects' places in the scene
HAND_LOW, HAND_HIGH = (-0.5, 0.4, 0.05), (0.5, 1.0, 0.5)  # Meta-World's limits of the hand for these tasks


class DoorDrawer(gym.Env):
    """One task in the scene. Meta-World's action: the hand's mocap moves by a[:3] / 100 (within its limits), a[3] is
    the gripper's effort; 5 physics steps a step. Reward 1 and a terminal when the task's success holds."""

    observation_space, action_space = gym.spaces.Box(-np.inf, np.inf, (12,)), gym.spaces.Box(-1.0, 1.0, (4,))

    def __init__(self, task, scene):
        self.task, self.model = task, mujoco.MjModel.from_xml_string(scene)
        self.data, self.joints = mujoco.MjData(self.model), [self.model.joint("doorjoint").qposadr[0]]
        self.joints.append(self.model.joint("goal_slidey").qposadr[0])

    def observe(self):
        d, drawer = self.data, self.data.body("drawer_link").xpos + [0.0, -0.16, 0.0]  # Meta-World's drawer handle
        grip = np.clip(np.linalg.norm(d.body("rightclaw").xpos - d.body("leftclaw").xpos) / 0.1, 0.0, 1.0)
        return np.concatenate([d.body("hand").xpos, [grip], d.geom("handle").xpos, drawer, d.qpos[self.joints]])

    def reset(self, seed=None, options=None):  # the hand to its start +-2 cm, then the task's object shut or open
        super().reset(seed=seed)  # and the other anywhere: Meta-World's order, so that the hand meets no open door
        mujoco.mj_resetData(self.model, self.data)
        rng, task = self.np_random, self.task
        hand = [{"door_open": DOOR[0] - 0.1, "door_close": DOOR[0] - 0.6}.get(task, DRAWER[0]), 0.6, 0.2]
        self.data.mocap_pos[0], self.data.mocap_quat[0] = hand + rng.uniform(-0.02, 0.02, 3), (1, 0, 1, 0)
        self.data.ctrl[:], self.steps = (-1, 1), 0
        mujoco.mj_step(self.model, self.data, 250)  # the hand settles (Meta-World: 50 steps of 5)
        door = {"door_open": 0.0, "door_close": -np.pi / 2}.get(task, rng.uniform(-np.pi / 2, 0.0))
        self.data.qpos[self.joints] = door, {"drawer_open": 0.0, "drawer_close": -0.15}.get(task, rng.uniform(-0.15, 0))
        mujoco.mj_forward(self.model, self.data)
        return self.observe(), {}

    def step(self, action):
        a = np.clip(action, -1.0, 1.0)
        self.data.mocap_pos[0] = np.clip(self.data.mocap_pos[0] + a[:3] / 100, HAND_LOW, HAND_HIGH)
        self.data.ctrl[:], self.steps = (a[3], -a[3]), self.steps + 1
        mujoco.mj_step(self.model, self.data, 5)
        obs = self.observe()
        success = bool(dd_relabel({"next_observations": obs[None]}, (self.task,))[1][0, 0])
        return obs, float(success), success, self.steps >= DD_STEPS, {}


def make_dd_env(task):
    spec = importlib.util.find_spec("metaworld")  # its model files only: its environments are not used
    assets = os.path.join(spec.submodule_search_locations[0], "assets") if spec else ""
    if not os.path.isdir(os.path.join(assets, "objects")):
        raise ImportError("door-drawer needs Meta-World's models: pip install metaworld==3.0.0")
    scene = open(os.path.join(HERE, "data", "door-drawer", "scene.xml")).read()  # ours: Meta-World's parts
    return DoorDrawer(task, scene.replace("ASSETS", assets))


def dd_relabel(data, tasks):
    """Meta-World's success rule of each task, from s' (data/README.md: door-drawer): rewards = terminals."""
    door, drawer = data["next_observations"][:, 4:7], data["next_observations"][:, 7:10]
    rules = {"door_open": np.abs(door[:, 0] - (DOOR[0] - 0.3)) <= 0.08,
             "door_close": np.linalg.norm(door - (DOOR + [0.2, -0.2, 0.0]), axis=1) <= 0.08,
             "drawer_open": np.linalg.norm(drawer - (DRAWER + [0.0, -0.36, 0.09]), axis=1) <= 0.03,
             "drawer_close": np.linalg.norm(drawer - (DRAWER + [0.0, -0.16, 0.04]), axis=1) <= 0.055}  # fmt: skip
    success = np.stack([rules[t] for t in tasks], 1)
    return success.astype(np.float32), success


DOMAINS["door-drawer"] = Domain(DD_TASKS, 12, 4, {
    "imbalanced": ("door_open_medium_replay", "door_close_expert", "drawer_open_expert", "drawer_close_medium_replay"),
    "medium-replay": tuple(f"{t}_medium_replay" for t in DD_TASKS),
}, "door-drawer", (), make_dd_env, dd_relabel, True, "door-drawer-", "python collect_door_drawer.py")  # fmt: skip


# ==== PLUMBING, identical in every script and pinned by tests/test_parity.py: loading and validation, the run folder,
# ==== checkpoints, RNG, Ctrl-C, memory, progress. Nothing below is the method. ========================================
DATASET_KEYS = {  # key: (trailing shape: the domain's observation or action size, or none; kind); plus the fields
    "observations": ("obs", "f"), "actions": ("act", "f"), "next_observations": ("obs", "f"), "rewards": ("", "f"),
    "terminals": ("", "b"), "timeouts": ("", "b"),
}  # fmt: skip
FIRST_PROGRESS_S, PROGRESS_EVERY_S = 5.0, 30.0  # the first progress line, then one every 30 s of wall time


class DatasetError(ValueError):
    """A dataset file that cannot be used; its message is one line for the user."""


def load_dataset(path, domain="mt-walker2d"):
    """Read one task's .npz of `domain` (format in data/README.md) and check every field; returns (task, dict)."""
    if os.path.isdir(path):
        raise DatasetError(f"{path} is a directory; a dataset is one .npz file per task")
    if not os.path.isfile(path):
        raise DatasetError(f"dataset file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            raw = {key: npz[key] for key in npz.files}
    except Exception as e:
        raise DatasetError(f"{path}: not a readable .npz file ({type(e).__name__})") from None
    record, source = DOMAINS[domain], str(raw.get("domain", "mt-walker2d"))  # MT-Walker2d's files name no domain
    tasks, obs_dim, act_dim = record.tasks, record.obs_dim, record.act_dim
    if source != domain:
        raise DatasetError(f"{path} holds {source} data, not {domain} data (choose the domain with --domain)")
    keys = DATASET_KEYS | {field: ("", "f") for field in record.fields}
    missing = [key for key in (*keys, "task") if key not in raw]
    if missing:
        raise DatasetError(f"{path}: missing keys {', '.join(missing)}")
    task, obs = str(raw["task"]), raw["observations"]
    if task not in tasks:
        raise DatasetError(f"{path}: unknown task {task!r}; choose from {', '.join(tasks)}")
    if obs.ndim != 2 or obs.shape[1] != obs_dim:
        raise DatasetError(f"{path}: observations have shape {obs.shape}, but {domain}'s have {obs_dim} features")
    data, n, sizes = {}, len(obs), {"obs": (obs_dim,), "act": (act_dim,), "": ()}
    for key, (size, kind) in keys.items():
        value, expected = raw[key], "floats" if kind == "f" else "booleans"
        if value.shape != (n, *sizes[size]):
            raise DatasetError(f"{path}: {key} has shape {value.shape}, expected {(n, *sizes[size])}")
        if value.dtype.kind not in ("fiu" if kind == "f" else "biu"):
            raise DatasetError(f"{path}: {key} has dtype {value.dtype}, expected {expected}")
        if kind == "f" and not np.isfinite(value).all():
            raise DatasetError(f"{path}: {key} contains NaN or inf")
        data[key] = value.astype(np.float32 if kind == "f" else bool)
    if n == 0:
        raise DatasetError(f"{path}: the dataset is empty")
    if np.abs(data["actions"]).max() > 1.0 + 1e-6:
        raise DatasetError(f"{path}: actions outside [-1, 1], the action space")
    return task, data


def load_mixture(args):
    """Load one dataset per task into one buffer: transitions of all tasks, relabelled to all tasks."""
    domain = DOMAINS[args.domain]
    tasks, mixtures = domain.tasks, domain.mixtures
    for task in args.tasks:
        if task not in tasks:
            raise DatasetError(f"unknown task {task!r} of {args.domain}; choose from {', '.join(tasks)}")
    if len(set(args.tasks)) != len(args.tasks):
        raise DatasetError(f"each task may appear once in --tasks, got {' '.join(args.tasks)}")
    for path in args.datasets:  # the first missing file or folder is named before any count
        if not os.path.isfile(path):
            load_dataset(path, args.domain)  # raises its one-line error
    if args.datasets and len(args.datasets) != len(args.tasks):
        raise DatasetError(f"--datasets needs one file per task ({len(args.tasks)}), got {len(args.datasets)}")
    if not args.datasets and args.mixture not in mixtures:
        raise DatasetError(f"unknown mixture {args.mixture!r} of {args.domain}; choose from {', '.join(mixtures)}")
    shipped = [mixtures[args.mixture][tasks.index(t)] for t in args.tasks] if not args.datasets else []
    paths = list(args.datasets) or [os.path.join(HERE, "data", domain.data_dir, name + ".npz") for name in shipped]
    parts = []
    for task, path in zip(args.tasks, paths):
        if not args.datasets and not os.path.isfile(path):
            raise DatasetError(f"{path} not found; {args.domain}'s files are made by: {domain.make_data}")
        source_task, data = load_dataset(path, args.domain)
        if source_task != task:
            raise DatasetError(f"{path} holds {source_task} data but was given for task {task}")
        parts.append(data)
    buffer = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    buffer["rewards_all"], buffer["terminals_all"] = domain.relabel(buffer, args.tasks)
    buffer["source"] = np.concatenate([np.full(len(p["rewards"]), i) for i, p in enumerate(parts)])
    buffer["sizes"] = np.array([len(p["rewards"]) for p in parts])
    return buffer, paths


def setup(args, limits):
    """Check the flags, load and relabel the data, seed everything, put the data (normalised) on the device."""
    keep_freed_memory()
    for name, interval in limits.items():
        value, (low, high) = getattr(args, name), (float(x) for x in interval[1:-1].split(","))
        above_low = value is None or (low <= value if interval[0] == "[" else low < value)  # None: an unset option
        if not (above_low and (value is None or (value <= high if interval[-1] == "]" else value < high))):
            fail(f"--{name.replace('_', '-')} must lie in {interval}, got {value}")  # NaN lies in no interval
    if args.device not in ("auto", "cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        fail(f"--device must be auto, cpu or cuda (with a CUDA device present), got {args.device!r}")
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if args.domain not in DOMAINS:
        fail(f"unknown domain {args.domain!r}; choose from {', '.join(DOMAINS)}")
    domain = DOMAINS[args.domain]
    args.tasks = args.tasks or domain.tasks  # by default every task and the first mixture of the domain
    args.mixture = args.mixture or next(iter(domain.mixtures))
    try:
        domain.make_env(domain.tasks[0]).close()  # the domain's simulator is installed
        data, paths = load_mixture(args)
    except (ImportError, DatasetError) as e:
        fail(str(e))
    path = os.path.join(HERE, "data", domain.data_dir, "reference.json")
    # random and expert returns (mazes: success rates of a random policy and of the scripted controller): 0-100
    ref = json.load(open(path))["tasks"] if os.path.isfile(path) else {}
    reference = {t: (ref[t]["random_return"], ref[t]["expert_return"]) for t in args.tasks if t in ref}
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.use_deterministic_algorithms(args.torch_deterministic, warn_only=True)
    all_obs = np.concatenate([data["observations"], data["next_observations"]])
    obs_mean, obs_std = all_obs.mean(0), all_obs.std(0) + 1e-3
    buf = {key: data[key] for key in ("actions", "rewards_all", "source", "sizes")}
    buf["terminals_all"] = data["terminals_all"].astype(np.float32)
    buf["obs"], buf["next_obs"] = ((data[key] - obs_mean) / obs_std for key in ("observations", "next_observations"))
    info = {"paths": paths, "reference": reference, "obs_mean": obs_mean, "obs_std": obs_std, "sizes": data["sizes"]}
    return device, {key: torch.tensor(value, device=device) for key, value in buf.items()}, info


class Run:
    """One run's folder, TensorBoard writer, evaluations, summary.json, checkpoint, progress line and Ctrl-C.
    `state` names all the checkpoint holds beside the counters: modules and optimisers (state_dict), tensors (copied
    in place), dicts and lists (refilled in place); save() and resume() both walk it, so they cannot disagree."""

    def __init__(self, args, device, info, total_steps, state, summary=()):
        self.args, self.device, self.info, self.total_steps, self.state = args, device, info, total_steps, state
        self.summary_keys, self.step, self.evals, self.wall_before = summary, 0, [], 0.0  # summary: names in `state`
        mixture = args.mixture if not args.datasets else "custom"
        self.name = f"{args.exp_name}__{DOMAINS[args.domain].run_prefix}{mixture}__{args.seed}"
        self.dir, self.ckpt_path = os.path.join("runs", self.name), os.path.join("runs", self.name, "checkpoint.pt")
        if os.path.exists(self.ckpt_path) and not args.resume:
            fail(f"{self.dir} already holds a run; pass --resume to continue it, or another --exp-name or --seed")
        if args.resume and not os.path.exists(self.ckpt_path):
            fail(f"--resume: no checkpoint at {self.ckpt_path}")
        self.saved_args = self.resume() if args.resume else {}
        os.makedirs(self.dir, exist_ok=True)
        self.writer = SummaryWriter(self.dir)
        table = "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
        sizes = ", ".join(f"{t} {s}" for t, s in zip(args.tasks, info["sizes"]))
        print(f"{self.name}: {len(args.tasks)} tasks, {sum(info['sizes'])} transitions ({sizes}), device {device}")
        self.log_time, self.log_step, self.progress_step = time.time(), self.step, None
        self.clock = self.log_time - self.wall_before  # wall time = time.time() - clock, over every resumed part
        self.diverged, self.stop_requested = torch.zeros((), dtype=torch.bool, device=device), False
        signal.signal(signal.SIGINT, self.on_ctrl_c)

    def resume(self):
        try:
            ckpt = torch.load(self.ckpt_path, map_location=self.device, weights_only=False)
            for name, obj in self.state.items():
                if hasattr(obj, "load_state_dict"):
                    obj.load_state_dict(ckpt[name])
                elif torch.is_tensor(obj):
                    obj.data.copy_(ckpt[name])
                elif isinstance(obj, dict):
                    obj.update(ckpt[name])
                else:
                    obj[:] = ckpt[name]
            rng = ckpt["rng"]
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"].cpu())
        except Exception as e:  # a truncated or foreign file, or one of other networks
            fail(f"--resume: cannot restore {self.ckpt_path} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step, self.evals, self.wall_before = ckpt["step"], ckpt["evals"], ckpt["wall_time"]
        print(f"resumed {self.name} at step {self.step}")
        return ckpt["args"]

    def save(self):
        """Write the checkpoint atomically (never after a NaN loss), so an interruption cannot break it."""
        self.check_finite()
        ckpt = {name: obj.state_dict() if hasattr(obj, "state_dict") else
                obj.detach().clone() if torch.is_tensor(obj) else obj for name, obj in self.state.items()}  # fmt: skip
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(), cuda=cuda)
        ckpt |= dict(step=self.step, evals=self.evals, wall_time=time.time() - self.clock, rng=rng)
        ckpt |= dict(args=asdict(self.args), tasks=self.args.tasks) | {k: self.info[k] for k in ("obs_mean", "obs_std")}
        torch.save(ckpt, self.ckpt_path + ".tmp")
        os.replace(self.ckpt_path + ".tmp", self.ckpt_path)

    def due(self, freq):
        return self.step % freq == 0 or self.step == self.total_steps

    def watch(self, losses):  # remembers, without a device sync, whether a loss was NaN or inf
        self.diverged |= ~torch.isfinite(torch.stack([v.detach().float() for v in losses.values()])).all()

    def check_finite(self, what="training diverged (a loss is NaN or inf)"):  # before anything is kept
        if self.diverged.item():
            fail(f"{what} before step {self.step}; the last good checkpoint is kept in {self.ckpt_path}", code=3)

    def log(self, losses, stats, *groups):
        """TensorBoard: losses/<name>_loss, losses/<stat>, each {key: value} of `groups`, and charts/SPS."""
        self.check_finite()
        losses = {f"losses/{k}_loss": v for k, v in losses.items()} | {f"losses/{k}": v for k, v in stats.items()}
        for key, value in (item for group in (losses, *groups) for item in group.items()):
            self.writer.add_scalar(key, torch.as_tensor(value).item(), self.step)
        sps = (self.step - self.log_step) / max(time.time() - self.log_time, 1e-9)
        self.writer.add_scalar("charts/SPS", sps, self.step)
        self.log_time, self.log_step = time.time(), self.step

    def evaluate(self, actor, per_task=None):
        """Evaluate every task, log eval/..., keep the result (and per_task: {name: [a value per task]})."""
        self.check_finite()
        args, info, out = self.args, self.info, {"step": self.step}
        norm = info["obs_mean"], info["obs_std"]
        returns = evaluate(actor, args.domain, args.tasks, args.eval_episodes, *norm, args.seed * 100_000, self.device)
        for i, task in enumerate(args.tasks):
            ret = float(returns[task].mean())
            random_return, expert_return = info["reference"].get(task, (math.nan, math.nan))  # 0-100: random to expert
            score = 100.0 * (ret - random_return) / (expert_return - random_return)
            out[task] = {"return": ret, "return_std": float(returns[task].std()), "normalized_score": score}
            out[task] |= {name: values[i] for name, values in (per_task or {}).items()}
        out |= {f"average_{k}": float(np.mean([out[t][k] for t in args.tasks])) for k in ("return", "normalized_score")}
        keys = [(f"{t}/{k}", out[t][k]) for t in args.tasks for k in ("return", "normalized_score")]
        for key, value in keys + [(f"average_{k}", out[f"average_{k}"]) for k in ("return", "normalized_score")]:
            self.writer.add_scalar(f"eval/{key}", value, self.step)
        self.evals.append(out)
        digits = 2 if DOMAINS[args.domain].success else 0  # a success rate, or a return
        scores = ", ".join(f"{t} {out[t]['return']:.{digits}f} ({out[t]['normalized_score']:.1f})" for t in args.tasks)
        print(f"eval @ {self.step}: {scores}; average score {out['average_normalized_score']:.1f}", flush=True)
        self.write_summary(finished=self.step == self.total_steps)

    def write_summary(self, finished):
        evals, scored = self.evals, all(math.isfinite(e["average_normalized_score"]) for e in self.evals)
        best = max(evals, key=lambda e: e["average_normalized_score"] if scored else e["average_return"], default=None)
        summary = {"exp_name": self.args.exp_name, "run_name": self.name, "finished": finished, "steps_done": self.step,
                   "wall_time_s": time.time() - self.clock, "device": str(self.device),
                   "datasets": dict(zip(self.args.tasks, self.info["paths"])), "final": evals[-1] if evals else None,
                   "best": best, "evals": evals, "args": asdict(self.args)}  # fmt: skip
        with open(os.path.join(self.dir, "summary.json"), "w") as f:
            json.dump(summary | {name: self.state[name] for name in self.summary_keys}, f, indent=1)

    def end_step(self, describe, step=None, total=None, label="step"):
        """Progress FIRST_PROGRESS_S after the first update, then every PROGRESS_EVERY_S; then a requested stop."""
        step, total, now = self.step if step is None else step, total or self.total_steps, time.time()
        if self.progress_step is None:  # rates count from the end of the first update, which allocates and compiles
            self.progress_step, self.progress_time, self.next_progress = step, now, now + FIRST_PROGRESS_S
        if now >= self.next_progress or step == total:
            self.check_finite()
            rate = (step - self.progress_step) / max(now - self.progress_time, 1e-9)
            last = self.evals[-1] if self.evals else None
            last = f"{last['average_normalized_score']:.1f} @ {last['step']}" if last else "none yet"
            eta = (total - step) / max(rate, 1e-9) / 60  # minutes
            eta = f"{eta / 60:.1f} h" if eta >= 60 else f"{eta:.0f} min" if eta >= 1 else f"{eta * 60:.0f} s"
            line = f"{label} {step}/{total} | {rate:.1f} updates/s | {describe()} | last eval {last} | ETA {eta}"
            print(line, flush=True)
            self.progress_step, self.progress_time, self.next_progress = step, now, now + PROGRESS_EVERY_S
        if self.stop_requested:
            self.check_finite("interrupted after the training diverged; stopped")
            self.save()
            self.write_summary(finished=False)
            print(f"\ninterrupted at {label} {step}; checkpoint saved, continue with --resume", flush=True)
            raise SystemExit(130)

    def on_ctrl_c(self, signum, frame):  # the step under way finishes, then end_step() saves and stops
        if self.stop_requested:
            fail(f"stopped at once by a second Ctrl-C; the last checkpoint is kept in {self.ckpt_path}", code=130)
        self.stop_requested = True

    def finish(self):
        self.writer.close()
        print(f"done: {self.step} steps in {time.time() - self.clock:.0f} s; summary in {self.dir}/summary.json")


def keep_freed_memory():
    """CPU speed: glibc maps each allocation over 32 MB afresh and unmaps it when freed, so each step page-faulted
    through the critic's activations again (a third of a CQL step). Freed blocks up to 1 GiB are now reused."""
    if sys.platform.startswith("linux") and sys.implementation.name == "cpython":
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: allocations up to 1 GiB come from the heap
        ctypes.CDLL("libc.so.6").mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap for reuse


def fail(message, code=2):
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a run that ends here no longer catches Ctrl-C
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


if __name__ == "__main__":
    main(tyro.cli(Args))
