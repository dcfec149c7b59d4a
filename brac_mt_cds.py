"""Multi-task BRAC with Conservative Data Sharing (CDS): one actor, one twin critic and one behaviour
model for all tasks, conditioned on a task one-hot; task i is trained on D_i plus the transitions of
other tasks that CDS routes to it, relabelled to task i.

BRAC-v (Wu, Tucker & Nachum, 2019): behaviour-regularised actor-critic with a value penalty. A
behaviour model pi_beta(a|s,i) is fitted by maximum likelihood to the data each task trains on; the
critic's target subtracts alpha * KL(pi || pi_beta)(s') and the actor minimises alpha * KL - Q. CDS
(Yu et al., NeurIPS 2021) routes a transition of task j to task i when its penalised Q-value under
task i reaches the top-k percentile of task i's own data (seed 000: r-hat = r - D(pi, pi_beta)).
`--share none` and `--share all` give BRAC's no-sharing and share-all baselines from the same file.
`python brac_mt_cds.py` trains on the shipped MT-Walker2d imbalanced mixture (run_forward/medium-replay,
run_backward/medium, jump/expert) and evaluates all three tasks.
"""
import ctypes
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of this experiment; the run is stored in runs/<exp_name>__<mixture>__<seed>"""
    seed: int = 1
    """seed of torch, numpy, random and the evaluation environments"""
    torch_deterministic: bool = True
    """make torch pick deterministic algorithms (same seed on CPU = same losses)"""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu` or `cuda`"""
    mixture: str = "imbalanced"
    """shipped dataset mixture: `imbalanced` (the paper's) or `all-medium`"""
    tasks: tuple[str, ...] = ("run_forward", "run_backward", "jump")
    """the tasks to train and evaluate, in order (their one-hot follows this order)"""
    datasets: tuple[str, ...] = ()
    """one .npz per task, in the order of --tasks (default: the mixture's shipped files)"""
    reference: str = os.path.join(HERE, "data", "reference.json")
    """random and expert returns per task, for 0-100 normalised scores"""
    total_steps: int = 1_000_000
    """gradient steps (each draws a batch for every task)"""
    batch_size: int = 256
    """transitions per task per gradient step"""
    gamma: float = 0.99
    """discount"""
    tau: float = 5e-3
    """Polyak rate of the target critics"""
    policy_lr: float = 3e-4
    """actor Adam learning rate (seed 003; BRAC's run_primal.sh: 3e-4 too)"""
    q_lr: float = 3e-4
    """critic Adam learning rate (as the CQL scripts; BRAC's code used 1e-3)"""
    hidden_dim: int = 256
    """width of every hidden layer"""
    n_hidden: int = 3
    """hidden layers of actor, behaviour model and critics (seed 003: 3x256)"""
    behavior_lr: float = 5e-4
    """behaviour model Adam learning rate (BRAC's behaviour cloning: 5e-4)"""
    alpha: float = 1.0
    """weight of the divergence D = KL(pi || pi_beta). BRAC's README and run_primal.sh used 0.1 for KL with a
    value penalty; on our data 0.1 let D_KL grow to 7-15 nats on the running tasks and their returns decay in
    every --share mode, while 1.0 kept D_KL near 1-2 nats (close to the paper's no-sharing values) and the
    running tasks near their best (a sweep of 0.1 / 0.3 / 1.0, see the README); at 3.0 the penalty outweighed the
    reward (Q of the data about -30) and the critic collapsed after 7k steps. With --target-kl: every task's
    starting alpha"""
    target_kl: float | None = None
    """with a value, each task's alpha is learned by dual gradient descent so that its D_KL tends to this many
    nats, starting from --alpha (BRAC's code: train_alpha with target_divergence, off by default, as here). With
    the value penalty it is unstable on our data: the critic learns Q of r - alpha D, so its pull on the actor
    grows with alpha, and alpha ran away (to 60-80 in 22k steps). With --policy-penalty-only, 1.5 held D_KL near
    1.5 nats on the no-sharing seed that over-estimated at a fixed alpha (see the README)"""
    alpha_lr: float = 1e-3
    """Adam learning rate of log alpha with --target-kl (BRAC's run_primal.sh: 1e-3 for its alpha)"""
    kl_samples: int = 4
    """actions sampled from pi per state to estimate the KL (BRAC's n_div_samples: 4)"""
    behavior_warmup_steps: int = 300_000
    """steps fitting only pi_beta before the actor-critic starts (BRAC cloned its behaviour model for 300k
    steps before training); not counted in --total-steps"""
    actor_warmup_steps: int = 20_000
    """first actor-critic steps in which the actor minimises alpha * D alone, without -Q, so that pi starts
    at pi_beta (BRAC's warm_start: 20k)"""
    policy_penalty_only: bool = False
    """BRAC-p: the penalty only in the actor loss, not in the critic's target (CDS then routes by the
    unpenalised Q)"""
    eval_freq: int = 10_000
    """gradient steps between evaluations (and one at the end)"""
    eval_episodes: int = 10
    """episodes per task per evaluation, with the mean action"""
    log_freq: int = 1_000
    """gradient steps between TensorBoard scalars and progress lines"""
    checkpoint_freq: int = 10_000
    """gradient steps between checkpoints (one is also written at the end and on Ctrl-C)"""
    resume: bool = False
    """continue runs/<run_name> from its checkpoint"""
    bf16: bool = False
    """bfloat16 autocast for the network passes (a fast path; off until measured safe)"""
    compile: bool = False
    """torch.compile the loss computation (a fast path)"""
    share: str = "cds"
    """which data task i trains on: `none` (D_i), `all` (the union, relabelled) or `cds`; the run directory
    is named after --exp-name, so give the baselines their own (e.g. --exp-name brac_mt_noshare)"""
    cds_percentile: float = 90.0
    """k: a candidate is routed when its Q-hat reaches the top-k percentile of the task's own batch (the value
    k% of the own batch's Q-hat exceed: 90 = its 10th percentile). The paper's k is not in our sources; a
    sweep on the imbalanced mixture chose 90 over 50: at 50 almost nothing was routed (other tasks' data
    really is worth less to each task), at 90 jump's expert data reaches the running tasks while <1% of the
    running data reaches jump (see the README)"""
    cds_basic: bool = False
    """CDS (basic): threshold at the mean Q-hat of the task's own batch instead of a percentile"""
    cds_candidates: int = 256
    """candidate transitions from the other tasks drawn per task per gradient step"""


# ---------------------------------------------------------------------------------------------
# Tasks: MT-Walker2d. Rewards and terminals are computed from stored transition fields, so any
# transition can be relabelled exactly to any task.
# ---------------------------------------------------------------------------------------------
TASKS = ("run_forward", "run_backward", "jump")
INIT_HEIGHT = 1.25  # h0: Walker2d's initial torso height
OBS_DIM, ACT_DIM = 17, 6


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
    raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


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
    raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


# ---------------------------------------------------------------------------------------------
# Data: the shipped mixtures, a loader that refuses bad files, and relabelling to every task.
# ---------------------------------------------------------------------------------------------
MIXTURES = {
    "imbalanced": {"run_forward": "run_forward_medium_replay", "run_backward": "run_backward_medium", "jump": "jump_expert"},
    "all-medium": {"run_forward": "run_forward_medium", "run_backward": "run_backward_medium", "jump": "jump_medium"},
}
DATASET_KEYS = {  # key: (trailing shape, kind)
    "observations": ((OBS_DIM,), "f"), "actions": ((ACT_DIM,), "f"), "next_observations": ((OBS_DIM,), "f"),
    "rewards": ((), "f"), "terminals": ((), "b"), "timeouts": ((), "b"), "x_velocity": ((), "f"),
}


class DatasetError(ValueError):
    """A dataset file that cannot be used; its message is one line for the user."""


def load_dataset(path):
    """Read one task's .npz (format in data/README.md) and check every field; returns (task, dict)."""
    if not os.path.isfile(path):
        raise DatasetError(f"dataset file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            raw = {key: npz[key] for key in npz.files}
    except Exception as e:
        raise DatasetError(f"{path}: not a readable .npz file ({type(e).__name__})") from None
    missing = [key for key in (*DATASET_KEYS, "task") if key not in raw]
    if missing:
        raise DatasetError(f"{path}: missing keys {', '.join(missing)}")
    task = str(raw["task"])
    if task not in TASKS:
        raise DatasetError(f"{path}: unknown task {task!r}; choose from {', '.join(TASKS)}")
    if raw["observations"].ndim != 2:
        raise DatasetError(f"{path}: observations has shape {raw['observations'].shape}, expected (N, {OBS_DIM})")
    n = len(raw["observations"])
    if raw["observations"].shape[1] != OBS_DIM:
        raise DatasetError(f"{path}: observations have {raw['observations'].shape[1]} features, "
                           f"but Walker2d-v5 observations have {OBS_DIM}")
    data = {}
    for key, (shape, kind) in DATASET_KEYS.items():
        value = raw[key]
        if value.shape != (n, *shape):
            raise DatasetError(f"{path}: {key} has shape {value.shape}, expected {(n, *shape)}")
        if kind == "f":
            if value.dtype.kind not in "fiu":
                raise DatasetError(f"{path}: {key} has dtype {value.dtype}, expected floats")
            if not np.isfinite(value).all():
                raise DatasetError(f"{path}: {key} contains NaN or inf")
            value = value.astype(np.float32)
        elif value.dtype.kind not in "biu":
            raise DatasetError(f"{path}: {key} has dtype {value.dtype}, expected booleans")
        data[key] = value.astype(bool) if kind == "b" else value
    if n == 0:
        raise DatasetError(f"{path}: the dataset is empty")
    if np.abs(data["actions"]).max() > 1.0 + 1e-6:
        raise DatasetError(f"{path}: actions outside [-1, 1], the Walker2d action space")
    return task, data


def relabel(data, tasks):
    """Rewards and terminals of every transition under every task: (N, len(tasks)) arrays."""
    rewards = np.stack([task_rewards(t, data["actions"], data["next_observations"], data["x_velocity"]) for t in tasks], 1)
    terminals = np.stack([task_terminals(t, data["next_observations"]) for t in tasks], 1)
    return rewards.astype(np.float32), terminals


def load_mixture(args):
    """Load one dataset per task into one buffer: transitions of all tasks, relabelled to all tasks."""
    for task in args.tasks:
        if task not in TASKS:
            raise DatasetError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if len(set(args.tasks)) != len(args.tasks):
        raise DatasetError(f"each task may appear once in --tasks, got {' '.join(args.tasks)}")
    if args.datasets:
        if len(args.datasets) != len(args.tasks):
            raise DatasetError(f"--datasets needs one file per task ({len(args.tasks)}), got {len(args.datasets)}")
        paths = list(args.datasets)
    else:
        if args.mixture not in MIXTURES:
            raise DatasetError(f"unknown mixture {args.mixture!r}; choose from {', '.join(MIXTURES)}")
        paths = [os.path.join(HERE, "data", MIXTURES[args.mixture][task] + ".npz") for task in args.tasks]
    parts = []
    for task, path in zip(args.tasks, paths):
        source_task, data = load_dataset(path)
        if source_task != task:
            raise DatasetError(f"{path} holds {source_task} data but was given for task {task}")
        parts.append(data)
    buffer = {key: np.concatenate([p[key] for p in parts]) for key in DATASET_KEYS}
    buffer["rewards_all"], buffer["terminals_all"] = relabel(buffer, args.tasks)
    buffer["source"] = np.concatenate([np.full(len(p["rewards"]), i) for i, p in enumerate(parts)])
    buffer["sizes"] = np.array([len(p["rewards"]) for p in parts])
    return buffer, paths


def load_reference(path, tasks):
    """Random and expert returns of each task (for normalised scores); None if absent."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            ref = json.load(f)["tasks"]
        return {t: (float(ref[t]["random_return"]), float(ref[t]["expert_return"])) for t in tasks if t in ref}
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{path}: not a reference file of per-task random and expert returns ({type(e).__name__})") from None


# ---------------------------------------------------------------------------------------------
# Networks: a tanh-Gaussian actor, twin critics and a tanh-Gaussian behaviour model, all fed
# [normalised obs, task one-hot].
# ---------------------------------------------------------------------------------------------
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def task_features(task_ids, n_tasks):
    return F.one_hot(task_ids, n_tasks).float()


class Actor(nn.Module):
    def __init__(self, n_tasks, hidden_dim=256, n_hidden=3):
        super().__init__()
        self.n_tasks = n_tasks
        layers, width = [], OBS_DIM + n_tasks
        for _ in range(n_hidden):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
            width = hidden_dim
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(hidden_dim, 2 * ACT_DIM)

    def forward(self, obs, task_ids):
        """Mean and log-std of the pre-tanh Gaussian."""
        out = self.head(self.trunk(torch.cat([obs, task_features(task_ids, self.n_tasks)], -1))).float()
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

    def __init__(self, n_tasks, hidden_dim=256, n_hidden=3):
        super().__init__()
        self.n_tasks = n_tasks
        widths = [OBS_DIM + n_tasks + ACT_DIM] + [hidden_dim] * n_hidden + [1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialisation, per member
            self.weights.append(nn.Parameter(torch.empty(2, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(2, 1, fan_out).uniform_(-bound, bound)))

    def forward(self, obs, task_ids, actions, detach_params=False):
        """Q1, Q2 of shape (2, *batch). detach_params: gradients reach the actions, not the critic."""
        x = torch.cat([obs, task_features(task_ids, self.n_tasks), actions], -1)
        batch_shape = x.shape[:-1]
        x = x.reshape(1, -1, x.shape[-1]).expand(2, -1, -1)
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            if detach_params:
                w, b = w.detach(), b.detach()
            x = torch.baddbmm(b, x, w)
            if k < len(self.weights) - 1:
                x = F.relu(x)
        return x.float().reshape(2, *batch_shape)


ACTION_EPS = 1e-3  # dataset actions are clipped to [-1 + eps, 1 - eps] before atanh (BRAC's CLIP_EPS)


def gaussian_log_prob(u, mean, log_std):
    """log N(u; mean, exp(log_std)^2), summed over the action dimensions."""
    return (-0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


class BehaviorModel(Actor):
    """pi_beta(a|s,i): a tanh-Gaussian with the actor's architecture (BRAC's code used one network class
    for its policy and its behaviour model), fitted by plain maximum likelihood. BRAC's cloning added a
    learned entropy bonus; here the log-std floor LOG_STD_MIN alone keeps pi_beta from collapsing."""

    def log_prob(self, obs, task_ids, actions):
        """log pi_beta(a|s,i) of given actions. Dataset actions can be exactly +-1, where atanh is
        infinite: they are clipped to [-1 + ACTION_EPS, 1 - ACTION_EPS] first, as BRAC's cloning did."""
        mean, log_std = self(obs, task_ids)
        a = actions.clamp(-1.0 + ACTION_EPS, 1.0 - ACTION_EPS)
        # log pi_beta(a) = log N(atanh(a)) - sum log(1 - a^2)
        return gaussian_log_prob(torch.atanh(a), mean, log_std) - torch.log1p(-a * a).sum(-1)


# ---------------------------------------------------------------------------------------------
# BRAC-v: behaviour-regularised actor-critic with a value penalty, all tasks and all sampled actions
# in one pass.
# ---------------------------------------------------------------------------------------------
def per_task_mean(x, weights):
    """Mean over each task's batch (weights mark the transitions each task trains on), then over tasks."""
    return ((x * weights).sum(-1) / weights.sum(-1).clamp_min(1e-8)).mean()


def task_means(x, weights):
    """Mean over each task's batch, one value per task: (n_tasks, M) -> (n_tasks,)."""
    return (x * weights).sum(-1) / weights.sum(-1).clamp_min(1e-8)


def kl_estimate(actor, behavior, obs, task_ids, n):
    """D(s) = KL(pi(.|s,i) || pi_beta(.|s,i)) from n reparameterised samples a = tanh(u) ~ pi.

    pi and pi_beta are tanh-Gaussians through the same tanh, whose Jacobian cancels in
    log pi(a) - log pi_beta(a): the estimate compares the two Gaussians at u, exact even where tanh(u)
    rounds to +-1 (BRAC's code clipped a by 1e-3 instead). No gradient reaches pi_beta.
    Returns D (*batch), the samples u (n, *batch, A) and their log pi(tanh(u)) (n, *batch).
    """
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
    """Actor, critic and behaviour-model losses of one gradient step.

    batch: tensors shaped (n_tasks, M, ...): obs, actions, rewards, terminals, next_obs, task_ids,
    and weights (1 where task i trains on the transition). alpha: (n_tasks,) divergence weights, no
    gradient (--alpha, or learned with --target-kl). q_weight: 0 during the actor's warm-up.
    No SAC entropy term, as in BRAC's primal agent (alpha_entropy = 0 by default and in its scripts):
    alpha D = alpha E[log pi - log pi_beta] already rewards pi's entropy. Returns (losses, stats,
    per-task stats).
    """
    obs, actions, next_obs, task_ids, weights = batch["obs"], batch["actions"], batch["next_obs"], batch["task_ids"], batch["weights"]
    with torch.autocast(obs.device.type, dtype=torch.bfloat16, enabled=args.bf16):
        # one actor pass for s and s': n actions from pi(.|s) and from pi(.|s'), D(s) and D(s')
        both_obs, both_ids = torch.cat([obs, next_obs], 1), torch.cat([task_ids, task_ids], 1)
        kl_both, u, log_pi = kl_estimate(actor, behavior, both_obs, both_ids, args.kl_samples)  # (T, 2M), (n, T, 2M, A)
        m = obs.shape[1]
        kl, next_kl = kl_both[:, :m], kl_both[:, m:].detach()  # D(s) with gradient, D(s')
        new_actions, next_actions = torch.tanh(u[0, :, :m]), torch.tanh(u[0, :, m:]).detach()  # a ~ pi(.|s), a' ~ pi(.|s')
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
    stats = {"q_data": per_task_mean(q_data.mean(0), weights).detach(), "kl": per_task_mean(kl, weights).detach(),
             "entropy": -per_task_mean(log_pi[0, :, :m], weights).detach(), "behavior_log_likelihood": -behavior_loss.detach()}
    per_task = {"kl": task_means(kl, weights).detach(), "q_data": task_means(q_data.mean(0), weights).detach(),
                "behavior_log_likelihood": task_means(behavior_log_prob, weights).detach()}
    return losses, stats, per_task


def alpha_loss(log_alpha, task_kl, target_kl):
    """--target-kl: dual gradient descent on alpha, as BRAC's train_alpha (loss -alpha (D - target)): each task's
    alpha grows while its D_KL is above the target and shrinks below it. Here on log alpha, so that alpha stays
    positive (BRAC's code clipped alpha to [0, 500]); BRAC's code also trained alpha during the actor's warm-up,
    where pi only moves toward pi_beta and alpha could only shrink; here it is learned once the actor sees Q.
    log_alpha: (n_tasks,) with gradient; task_kl: (n_tasks,) D_KL of each task's batch, no gradient."""
    return -(log_alpha * (task_kl - target_kl)).sum()


def gather(buf, indices, weights):
    """Batch tensors (n_tasks, M, ...); row i reads rewards and terminals relabelled to task i."""
    task_ids = torch.arange(indices.shape[0], device=indices.device)[:, None].expand_as(indices)
    return {
        "obs": buf["obs"][indices], "actions": buf["actions"][indices], "next_obs": buf["next_obs"][indices],
        "rewards": buf["rewards_all"][indices, task_ids], "terminals": buf["terminals_all"][indices, task_ids],
        "task_ids": task_ids, "weights": weights,
    }


def sample_own(starts, sizes, batch_size):
    """(n_tasks, batch_size) buffer indices: row i uniform over task i's own dataset D_i."""
    u = torch.rand(len(sizes), batch_size, dtype=torch.float64, device=sizes.device)
    return starts[:, None] + (u * sizes[:, None]).long()


def sample_others(starts, sizes, batch_size):
    """(n_tasks, batch_size) buffer indices: row i uniform over every dataset but task i's own."""
    u = torch.rand(len(sizes), batch_size, dtype=torch.float64, device=sizes.device)
    indices = (u * (sizes.sum() - sizes)[:, None]).long()  # an index into the union without D_i ...
    return indices + sizes[:, None] * (indices >= starts[:, None])  # ... shifted past D_i


# ---------------------------------------------------------------------------------------------
# ALGO LOGIC: the sharing rule. CDS: route a transition of task j to task i when its conservative
# Q-value under task i is high compared with task i's own data. BRAC's critic is conservative through
# its value penalty: it learns Q of r-hat = r - alpha D(pi, pi_beta) (seed 000). --share none / all:
# the baselines, as in cql_mt_noshare.py and cql_mt_shareall.py.
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def conservative_q(critic, buf, indices):
    """Q-hat(s, a, i) = min_k Q_k(s, a, i), no gradient; row i of `indices` is scored under task i."""
    task_ids = torch.arange(indices.shape[0], device=indices.device)[:, None].expand_as(indices)
    return critic(buf["obs"][indices], task_ids, buf["actions"][indices]).min(0).values


def cds_route(q_own, q_candidates, percentile, basic=False):
    """CDS weights w = 1[Q-hat(s, a, i) - threshold_i >= 0], threshold_i over task i's own batch.

    threshold_i: the top-`percentile` percentile of Q-hat over D_i (the value that k% of it exceeds),
    or with `basic` the mean, E_{D_i}[Q-hat] (CDS basic). Shapes (n_tasks, M) -> bool (n_tasks, M').
    """
    if basic:
        threshold = q_own.mean(1)
    else:
        threshold = torch.quantile(q_own, 1.0 - percentile / 100.0, dim=1)
    return q_candidates >= threshold[:, None]


def sharing_fractions(source, tasks):
    """{'sharing/<src>_to_<dst>': fraction of dst's batch that came from src's dataset}."""
    return {f"sharing/{src}_to_{dst}": (source[i] == j).float().mean()
            for i, dst in enumerate(tasks) for j, src in enumerate(tasks) if i != j}


def sample_none(buf, starts, sizes, args):
    """No sharing: each task's batch comes from its own data. Returns (batch, sharing stats)."""
    indices = sample_own(starts, sizes, args.batch_size)
    return gather(buf, indices, torch.ones(indices.shape, device=indices.device)), {}


def sample_all(buf, starts, sizes, args):
    """Share all: each task's batch is uniform over all transitions. Returns (batch, sharing stats)."""
    u = torch.rand(len(sizes), args.batch_size, dtype=torch.float64, device=sizes.device)
    indices = (u * sizes.sum()).long()  # uniform over the union of all D_j
    batch = gather(buf, indices, torch.ones(indices.shape, device=indices.device))
    return batch, sharing_fractions(buf["source"][indices], args.tasks)


def drop_unrouted(candidates, routed):
    """Fewer weight-zero rows to compute: each row keeps its routed candidates first, and the columns
    past the largest routed count (unrouted for every task) are dropped."""
    order = torch.argsort((~routed).to(torch.int8), dim=1, stable=True)
    keep = order[:, : int(routed.sum(1).max())]
    return candidates.gather(1, keep), routed.gather(1, keep)


def sample_batch(buf, starts, sizes, critic, args):
    """CDS: each task's own batch plus the candidates CDS routes to it (or a baseline's batch, with
    --share none or all). Returns (batch, sharing stats)."""
    if args.share == "none":
        return sample_none(buf, starts, sizes, args)
    if args.share == "all":
        return sample_all(buf, starts, sizes, args)
    own = sample_own(starts, sizes, args.batch_size)
    candidates = sample_others(starts, sizes, args.cds_candidates)
    q_own, q_candidates = conservative_q(critic, buf, own), conservative_q(critic, buf, candidates)
    routed = cds_route(q_own, q_candidates, args.cds_percentile, args.cds_basic)
    source = buf["source"][candidates]
    stats = {}
    for i, dst in enumerate(args.tasks):
        for j, src in enumerate(args.tasks):
            if i != j:  # the paper's "CDS weight": the fraction of src's candidates routed to dst
                from_src = (source[i] == j).float()
                stats[f"sharing/{src}_to_{dst}"] = (routed[i] * from_src).sum() / from_src.sum().clamp_min(1)
        stats[f"cds/{dst}/q_own"] = q_own[i].mean()
        stats[f"cds/{dst}/q_routed"] = (q_candidates[i] * routed[i]).sum() / routed[i].sum()  # NaN: none routed
        stats[f"cds/{dst}/routed_fraction"] = routed[i].float().mean()
    kept, kept_routed = drop_unrouted(candidates, routed)  # same losses, fewer rows to compute
    indices = torch.cat([own, kept], 1)
    weights = torch.cat([torch.ones(own.shape, device=own.device), kept_routed.float()], 1)
    return gather(buf, indices, weights), stats


# ---------------------------------------------------------------------------------------------
# Evaluation: every task's episodes stepped together, one actor pass per step for all of them.
# ---------------------------------------------------------------------------------------------
def evaluate(actor, tasks, episodes, obs_mean, obs_std, seed, device):
    """Mean-action returns: {task: array of `episodes` returns}."""
    envs = [(i, make_env(task)) for i, task in enumerate(tasks) for _ in range(episodes)]
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
    return {task: returns[i * episodes:(i + 1) * episodes] for i, task in enumerate(tasks)}


def normalized_score(task, ret, reference):
    """D4RL-style 0-100 score: 0 = random policy, 100 = the expert behaviour policy."""
    if reference is None or task not in reference:
        return float("nan")
    random_return, expert_return = reference[task]
    return 100.0 * (ret - random_return) / (expert_return - random_return)


# ---------------------------------------------------------------------------------------------
# Checkpoints: written atomically, so an interruption never leaves a broken file.
# ---------------------------------------------------------------------------------------------
def save_checkpoint(path, state):
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def keep_freed_memory():
    """CPU speed: keep freed memory in the process instead of handing it back to the OS.

    glibc serves every allocation over 32 MB with a fresh mmap and unmaps it when freed, so each
    gradient step page-faults its way through the critic's activations again (about 50 MB per layer
    at the defaults): a third of a CQL step on CPU. Raising the two thresholds to 1 GiB lets freed
    blocks be reused; it changes no result. No-op where the C library is not glibc.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            return
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: allocations up to 1 GiB come from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap for reuse


def warn_over_estimation(task, q, ceiling, step, ckpt_path, warnings):
    """Once per task: the critic rates the task's data above any value its targets can build. BRAC's value
    penalty does not stop its critic from extrapolating upward at actions the data lacks (the README's
    no-sharing seed 2). The run goes on; the checkpoint written before this step is copied aside."""
    kept = ckpt_path.replace(".pt", f"_before_{task}_overestimated.pt")
    if os.path.exists(ckpt_path):
        shutil.copyfile(ckpt_path, kept)
    message = (f"step {step}: the critic rates {task}'s data at Q {q:.0f}, above any value its targets can build "
               f"from the data's rewards (max r / (1 - gamma) = {ceiling:.0f}): it over-estimates, and the returns "
               f"that follow are not to be trusted; the last checkpoint before this is kept in {kept}")
    print(f"warning: {message}", flush=True)
    warnings.append({"step": step, "task": task, "message": message})


def fail(message, code=2):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(args: Args):
    # TRY NOT TO MODIFY: setup, data, networks
    keep_freed_memory()
    for name in ("total_steps", "batch_size", "eval_freq", "eval_episodes", "log_freq", "checkpoint_freq", "kl_samples"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("behavior_warmup_steps", "actor_warmup_steps"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be zero or positive, got {getattr(args, name)}")
    if not args.alpha >= 0:
        fail(f"--alpha must be zero or positive, got {args.alpha}")
    if args.target_kl is not None and not (args.target_kl > 0 and args.alpha > 0 and args.alpha_lr > 0):
        fail(f"--target-kl learns alpha from --alpha at --alpha-lr: all three must be positive, "
             f"got {args.target_kl}, {args.alpha} and {args.alpha_lr}")
    if args.share not in ("none", "all", "cds"):
        fail(f"--share must be none, all or cds, got {args.share!r}")
    if args.device not in ("auto", "cpu", "cuda"):
        fail(f"--device must be auto, cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda asked for, but no CUDA device is available")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    try:
        data, paths = load_mixture(args)
        reference = load_reference(args.reference, args.tasks)
    except DatasetError as e:
        fail(str(e))
    run_name = f"{args.exp_name}__{args.mixture if not args.datasets else 'custom'}__{args.seed}"
    run_dir = os.path.join("runs", run_name)
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    if os.path.exists(ckpt_path) and not args.resume:
        fail(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --exp-name or --seed")
    if args.resume and not os.path.exists(ckpt_path):
        fail(f"--resume: no checkpoint at {ckpt_path}")
    os.makedirs(run_dir, exist_ok=True)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.use_deterministic_algorithms(args.torch_deterministic, warn_only=True)

    # observation normalisation with the statistics of all the data (applied at evaluation too)
    all_obs = np.concatenate([data["observations"], data["next_observations"]])
    obs_mean, obs_std = all_obs.mean(0), all_obs.std(0) + 1e-3
    buf = {
        "obs": torch.tensor((data["observations"] - obs_mean) / obs_std, dtype=torch.float32, device=device),
        "next_obs": torch.tensor((data["next_observations"] - obs_mean) / obs_std, dtype=torch.float32, device=device),
        "actions": torch.tensor(data["actions"], device=device),
        "rewards_all": torch.tensor(data["rewards_all"], device=device),
        "terminals_all": torch.tensor(data["terminals_all"], dtype=torch.float32, device=device),
        "source": torch.tensor(data["source"], device=device),
    }
    sizes = torch.tensor(data["sizes"], device=device)
    starts = torch.cumsum(sizes, 0) - sizes
    n_tasks = len(args.tasks)
    # the critic's targets are built from the data's rewards only, so no fixed point exceeds max r / (1 - gamma):
    # a critic that rates the data above it over-estimates
    q_ceiling = (buf["rewards_all"].max(0).values / (1.0 - args.gamma)).tolist()
    if n_tasks < 2 and args.share == "cds":
        fail("CDS shares data between tasks: give it at least two --tasks (or --share none)")

    actor = Actor(n_tasks, args.hidden_dim, args.n_hidden).to(device)
    critic = TwinCritic(n_tasks, args.hidden_dim, args.n_hidden).to(device)
    critic_target = TwinCritic(n_tasks, args.hidden_dim, args.n_hidden).to(device)
    critic_target.load_state_dict(critic.state_dict())
    behavior = BehaviorModel(n_tasks, args.hidden_dim, args.n_hidden).to(device)
    actor_optim = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    critic_optim = torch.optim.Adam(critic.parameters(), lr=args.q_lr)
    behavior_optim = torch.optim.Adam(behavior.parameters(), lr=args.behavior_lr)
    # alpha, one per task: --alpha, or learned toward --target-kl by dual gradient descent on log alpha
    log_alpha = torch.full((n_tasks,), float(args.alpha), device=device).log().requires_grad_(args.target_kl is not None)
    alpha_optim = torch.optim.Adam([log_alpha], lr=args.alpha_lr)
    step, behavior_step, evals, wall_before, warnings = 0, 0, [], 0.0, []
    if args.resume:
        try:
            ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        except Exception as e:  # a truncated or foreign file
            fail(f"--resume: cannot read the checkpoint {ckpt_path} ({type(e).__name__}: {e})")
        if ckpt["args"]["share"] != args.share:
            fail(f"--resume: {run_dir} was trained with --share {ckpt['args']['share']}, not {args.share}")
        for module, key in ((actor, "actor"), (critic, "critic"), (critic_target, "critic_target"), (behavior, "behavior"),
                            (actor_optim, "actor_optim"), (critic_optim, "critic_optim"), (behavior_optim, "behavior_optim")):
            module.load_state_dict(ckpt[key])
        if args.target_kl is not None and ckpt["args"].get("target_kl") is not None:  # else alpha restarts at --alpha
            with torch.no_grad():
                log_alpha.copy_(ckpt["log_alpha"])
            alpha_optim.load_state_dict(ckpt["alpha_optim"])
        step, behavior_step, evals, wall_before = ckpt["step"], ckpt["behavior_step"], ckpt["evals"], ckpt["wall_time"]
        warnings = ckpt.get("warnings", [])
        set_rng_state(ckpt["rng"])
        print(f"resumed {run_name} at step {step}")
    loss_fn = torch.compile(brac_losses) if args.compile else brac_losses

    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    print(f"{run_name}: {n_tasks} tasks, {len(data['rewards'])} transitions "
          f"({', '.join(f'{t} {s}' for t, s in zip(args.tasks, data['sizes']))}), device {device}")

    def state():
        return {"actor": actor.state_dict(), "critic": critic.state_dict(), "critic_target": critic_target.state_dict(),
                "behavior": behavior.state_dict(), "log_alpha": log_alpha.detach().clone(), "alpha_optim": alpha_optim.state_dict(),
                "actor_optim": actor_optim.state_dict(),
                "critic_optim": critic_optim.state_dict(), "behavior_optim": behavior_optim.state_dict(),
                "step": step, "behavior_step": behavior_step, "evals": evals, "warnings": warnings,
                "wall_time": wall_before + time.time() - start_time, "rng": rng_state(), "args": asdict(args),
                "obs_mean": obs_mean, "obs_std": obs_std, "tasks": args.tasks}

    def run_evaluation(kl, alpha):
        returns = evaluate(actor, args.tasks, args.eval_episodes, obs_mean, obs_std, args.seed * 100_000, device)
        result = {"step": step}
        for i, task in enumerate(args.tasks):
            ret = float(returns[task].mean())
            result[task] = {"return": ret, "return_std": float(returns[task].std()),
                            "normalized_score": normalized_score(task, ret, reference), "kl": kl[i], "alpha": alpha[i]}
            writer.add_scalar(f"eval/{task}/return", ret, step)
            writer.add_scalar(f"eval/{task}/normalized_score", result[task]["normalized_score"], step)
        result["average_return"] = float(np.mean([result[t]["return"] for t in args.tasks]))
        result["average_normalized_score"] = float(np.mean([result[t]["normalized_score"] for t in args.tasks]))
        writer.add_scalar("eval/average_return", result["average_return"], step)
        writer.add_scalar("eval/average_normalized_score", result["average_normalized_score"], step)
        evals.append(result)
        print(f"eval @ {step}: " + ", ".join(f"{t} {result[t]['return']:.0f} ({result[t]['normalized_score']:.1f})"
                                             for t in args.tasks) + f"; average score {result['average_normalized_score']:.1f}")

    def write_summary(finished):
        scored = evals and all(math.isfinite(e["average_normalized_score"]) for e in evals)
        best = max(evals, key=lambda e: e["average_normalized_score"] if scored else e["average_return"], default=None)
        summary = {"exp_name": args.exp_name, "run_name": run_name, "finished": finished, "steps_done": step,
                   "wall_time_s": wall_before + time.time() - start_time, "device": str(device),
                   "datasets": dict(zip(args.tasks, paths)), "final": evals[-1] if evals else None, "best": best,
                   "warnings": warnings, "evals": evals, "args": asdict(args)}
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)

    # ALGO LOGIC: the training loop
    start_time, sps_time, sps_step = time.time(), time.time(), step
    diverged = torch.zeros((), dtype=torch.bool, device=device)
    stop_requested = []

    def on_ctrl_c(signum, frame):  # Ctrl-C: finish the step under way, then checkpoint and stop
        if stop_requested:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        stop_requested.append(True)

    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        warmup_time, warmup_step = time.time(), behavior_step
        while behavior_step < args.behavior_warmup_steps:  # BRAC: pi_beta is fitted before the actor-critic starts
            # its warm-up data: the union with --share all, else D_i (CDS routes nothing before its critic learns)
            batch, _ = (sample_all if args.share == "all" else sample_none)(buf, starts, sizes, args)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                # max_beta E_{(s, a) ~ D_i}[log pi_beta(a|s, i)]
                log_prob = behavior.log_prob(batch["obs"], batch["task_ids"], batch["actions"])
                log_likelihood = per_task_mean(log_prob, batch["weights"])
            diverged |= ~torch.isfinite(log_likelihood.detach())
            behavior_optim.zero_grad(set_to_none=True)
            (-log_likelihood).backward()
            behavior_optim.step()
            behavior_step += 1
            done = behavior_step == args.behavior_warmup_steps
            if behavior_step % args.log_freq == 0 or behavior_step % args.checkpoint_freq == 0 or done:
                if diverged.item():
                    fail(f"the behaviour model diverged (its log-likelihood is NaN or inf) in warm-up step {behavior_step}; "
                         f"the last good checkpoint is kept in {ckpt_path}", code=3)
            if behavior_step % args.log_freq == 0 or done:
                sps = (behavior_step - warmup_step) / (time.time() - warmup_time)
                warmup_time, warmup_step = time.time(), behavior_step
                writer.add_scalar("warmup/behavior_log_likelihood", log_likelihood.item(), behavior_step)
                eta = (args.behavior_warmup_steps - behavior_step) / max(sps, 1e-9)
                print(f"behaviour warm-up {behavior_step}/{args.behavior_warmup_steps} | SPS {sps:.1f} "
                      f"| log-likelihood {log_likelihood.item():.2f} | ETA {eta / 3600:.1f} h", flush=True)
            if behavior_step % args.checkpoint_freq == 0 or done:
                save_checkpoint(ckpt_path, state())
            if stop_requested:  # Ctrl-C in the warm-up: as in the training loop below
                if diverged.item():
                    fail(f"interrupted after the behaviour model diverged; the last good checkpoint is kept in {ckpt_path}", code=3)
                save_checkpoint(ckpt_path, state())
                write_summary(finished=False)
                print(f"\ninterrupted in behaviour warm-up step {behavior_step}; checkpoint saved, continue with --resume",
                      flush=True)
                raise SystemExit(130)

        sps_time, sps_step = time.time(), step
        while step < args.total_steps:
            batch, sharing = sample_batch(buf, starts, sizes, critic, args)
            q_weight = float(step >= args.actor_warmup_steps)  # BRAC's warm start: the actor ignores Q at first
            alpha = log_alpha.detach().exp()
            losses, stats, per_task = loss_fn(actor, critic, critic_target, behavior, batch, args, alpha, q_weight)
            if args.target_kl is not None and q_weight > 0:  # not in the actor's warm-up, where alpha could only shrink
                losses["alpha"] = alpha_loss(log_alpha, per_task["kl"], args.target_kl)
            diverged |= ~torch.isfinite(torch.stack([v.detach() for v in losses.values()])).all()
            for optim in (actor_optim, critic_optim, behavior_optim, alpha_optim):
                optim.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            actor_optim.step()
            critic_optim.step()
            behavior_optim.step()
            if "alpha" in losses:
                alpha_optim.step()
            with torch.no_grad():  # Polyak averaging of the target critics
                for p, tp in zip(critic.parameters(), critic_target.parameters()):
                    tp.lerp_(p, args.tau)
            step += 1

            if step % args.log_freq == 0 or step % args.checkpoint_freq == 0 or step == args.total_steps:
                if diverged.item():
                    fail(f"training diverged (a loss is NaN or inf) before step {step}; "
                         f"the last good checkpoint is kept in {ckpt_path}", code=3)
            if step % args.log_freq == 0:
                sps = (step - sps_step) / (time.time() - sps_time)
                sps_time, sps_step = time.time(), step
                for key, value in losses.items():
                    writer.add_scalar(f"losses/{key}_loss", value.item(), step)
                for key, value in stats.items():
                    writer.add_scalar(f"losses/{key}", value.item(), step)
                for i, task in enumerate(args.tasks):  # D_KL(pi, pi_beta) per task: the paper's analysis table
                    for key, value in per_task.items():
                        writer.add_scalar(f"brac/{task}/{key}", value[i].item(), step)
                    writer.add_scalar(f"brac/{task}/alpha", alpha[i].item(), step)
                for key, value in sharing.items():
                    writer.add_scalar(key, value.item(), step)
                writer.add_scalar("charts/SPS", sps, step)
                for i, task in enumerate(args.tasks):
                    q = per_task["q_data"][i].item()
                    if q > q_ceiling[i] and not any(w["task"] == task for w in warnings):
                        warn_over_estimation(task, q, q_ceiling[i], step, ckpt_path, warnings)
                eta = (args.total_steps - step) / max(sps, 1e-9)
                last = f"{evals[-1]['average_normalized_score']:.1f} @ {evals[-1]['step']}" if evals else "none yet"
                learned = f"| alpha {' '.join(f'{x:.2f}' for x in alpha.tolist())} " if args.target_kl is not None else ""
                print(f"step {step}/{args.total_steps} | SPS {sps:.1f} | critic {losses['critic'].item():.2f} "
                      f"| Q(data) {stats['q_data'].item():.1f} | KL {stats['kl'].item():.2f} {learned}"
                      f"| last eval score {last} | ETA {eta / 3600:.1f} h", flush=True)
            if step % args.eval_freq == 0 or step == args.total_steps:
                run_evaluation(per_task["kl"].tolist(), alpha.tolist())
                write_summary(finished=step == args.total_steps)
            if step % args.checkpoint_freq == 0 or step == args.total_steps:
                save_checkpoint(ckpt_path, state())
            if stop_requested:
                if diverged.item():
                    fail(f"interrupted after the training diverged; the last good checkpoint is kept in {ckpt_path}", code=3)
                save_checkpoint(ckpt_path, state())
                write_summary(finished=False)
                print(f"\ninterrupted at step {step}; checkpoint saved, continue with --resume", flush=True)
                raise SystemExit(130)
    except KeyboardInterrupt:
        fail(f"stopped at once by a second Ctrl-C; the last checkpoint is kept in {ckpt_path}", code=130)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    writer.close()
    print(f"done: {step} steps in {wall_before + time.time() - start_time:.0f} s; summary in {run_dir}/summary.json")


if __name__ == "__main__":
    main(tyro.cli(Args))
