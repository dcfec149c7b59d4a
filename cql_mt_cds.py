"""Multi-task CQL with Conservative Data Sharing (CDS): one actor and one twin critic for all tasks,
conditioned on a task one-hot; task i is trained on D_i plus the transitions of other tasks that
CDS routes to it, relabelled to task i.

CDS (Yu et al., NeurIPS 2021): a transition (s, a) of task j is shared with task i when its
conservative Q-value under task i reaches the top-k percentile of the conservative Q-values of task
i's own data. CQL(H) on SAC as in Kumar et al. (2020). `python cql_mt_cds.py` trains on the shipped
MT-Walker2d imbalanced mixture (run_forward/medium-replay, run_backward/medium, jump/expert) and
evaluates all three tasks.
"""
import ctypes
import json
import math
import os
import random
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
    """actor Adam learning rate (seed 003; the CQL paper used 1e-4)"""
    q_lr: float = 3e-4
    """critic Adam learning rate"""
    hidden_dim: int = 256
    """width of every hidden layer"""
    n_hidden: int = 3
    """hidden layers of actor and critics (seed 003: 3x256)"""
    cql_alpha: float = 5.0
    """weight of the CQL regulariser (seed 003: 5.0)"""
    cql_n_actions: int = 10
    """actions of each kind (uniform, pi(.|s), pi(.|s')) in the logsumexp"""
    cql_lagrange: bool = False
    """tune the CQL weight by dual gradient descent so the gap stays near cql_target_gap"""
    cql_target_gap: float = 10.0
    """with --cql-lagrange: the target of logsumexp Q - Q(data)"""
    backup_entropy: bool = False
    """subtract alpha * log pi(a'|s') in the TD target (CQL's default is not to)"""
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
# Networks: a tanh-Gaussian actor and twin critics, both fed [normalised obs, task one-hot].
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


# ---------------------------------------------------------------------------------------------
# CQL(H) on SAC, all tasks and all sampled actions in one pass.
# ---------------------------------------------------------------------------------------------
def per_task_mean(x, weights):
    """Mean over each task's batch (weights mark the transitions each task trains on), then over tasks."""
    return ((x * weights).sum(-1) / weights.sum(-1).clamp_min(1e-8)).mean()


def cql_losses(actor, critic, critic_target, log_alpha, log_cql_alpha, batch, args):
    """Actor, critic, entropy and CQL-weight losses of one gradient step.

    batch: tensors shaped (n_tasks, M, ...): obs, actions, rewards, terminals, next_obs, task_ids,
    and weights (1 where task i trains on the transition). Returns (losses, stats).
    """
    obs, actions, next_obs, task_ids, weights = batch["obs"], batch["actions"], batch["next_obs"], batch["task_ids"], batch["weights"]
    n = args.cql_n_actions
    alpha = log_alpha.exp().detach()
    with torch.autocast(obs.device.type, dtype=torch.bfloat16, enabled=args.bf16):
        # one actor pass for s and s': 1 + n actions from pi(.|s) and from pi(.|s')
        both_obs, both_ids = torch.cat([obs, next_obs], 1), torch.cat([task_ids, task_ids], 1)
        pi_actions, pi_log_probs = actor.sample(both_obs, both_ids, n + 1)  # (n+1, T, 2M, A), (n+1, T, 2M)
        m = obs.shape[1]
        new_actions, new_log_probs = pi_actions[0, :, :m], pi_log_probs[0, :, :m]  # a ~ pi(.|s), with gradient
        next_actions, next_log_probs = pi_actions[0, :, m:].detach(), pi_log_probs[0, :, m:].detach()  # a' ~ pi(.|s')

        # actor: min_pi E[alpha log pi(a|s) - min_k Q_k(s, a)]
        q_new = critic(obs, task_ids, new_actions, detach_params=True).min(0).values
        actor_loss = per_task_mean(alpha * new_log_probs - q_new, weights)
        # entropy temperature: min_alpha E[-alpha (log pi(a|s) + target_entropy)]
        alpha_loss = per_task_mean(-log_alpha.exp() * (new_log_probs.detach() - ACT_DIM), weights)

        # TD target: y = r + gamma (1 - d) (min_k Q'_k(s', a') [- alpha log pi(a'|s')])
        with torch.no_grad():
            next_q = critic_target(next_obs, task_ids, next_actions).min(0).values
            if args.backup_entropy:
                next_q = next_q - alpha * next_log_probs
            target = batch["rewards"] + args.gamma * (1.0 - batch["terminals"]) * next_q

        # CQL(H): Q(s, a_data) and Q(s, .) at n uniform, n pi(.|s) and n pi(.|s') actions, one pass
        uniform = torch.rand((n, *actions.shape), device=actions.device) * 2 - 1
        cql_actions = torch.cat([actions.unsqueeze(0), uniform, pi_actions[1:, :, :m].detach(), pi_actions[1:, :, m:].detach()])
        q_all = critic(obs.expand(1 + 3 * n, *obs.shape), task_ids.expand(1 + 3 * n, *task_ids.shape), cql_actions)
        q_data = q_all[:, 0]  # (2, T, M)
        # importance weights: uniform density 1/2^A; policy samples by their own log-density
        log_densities = torch.cat([
            torch.full((n, *task_ids.shape), -ACT_DIM * math.log(2.0), device=obs.device),
            pi_log_probs[1:, :, :m].detach(),
            pi_log_probs[1:, :, m:].detach(),
        ])
        logsumexp = torch.logsumexp(q_all[:, 1:] - log_densities, dim=1)  # log sum_a exp(Q(s,a)) / mu(a)
        cql_gap = logsumexp - q_data  # (2, T, M): pushed down, weighted by cql_alpha

    td_loss = per_task_mean(((q_data - target) ** 2).sum(0), weights)  # both critics
    gap = per_task_mean(cql_gap.sum(0), weights) / 2
    if args.cql_lagrange:  # alpha' (gap - target_gap), alpha' tuned to keep the gap near its target
        cql_alpha = log_cql_alpha.exp().clamp(0.0, 1e6)
        cql_loss = 2 * cql_alpha.detach() * (gap - args.cql_target_gap)
        cql_alpha_loss = -cql_alpha * (gap.detach() - args.cql_target_gap)
    else:
        cql_loss = 2 * args.cql_alpha * gap
        cql_alpha_loss = torch.zeros((), device=obs.device)
    critic_loss = td_loss + cql_loss
    losses = {"critic": critic_loss, "actor": actor_loss, "alpha": alpha_loss, "cql_alpha": cql_alpha_loss}
    stats = {"td_loss": td_loss.detach(), "cql_gap": gap.detach(), "q_data": per_task_mean(q_data.mean(0), weights).detach(),
             "entropy": -per_task_mean(new_log_probs, weights).detach()}
    return losses, stats


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
# Q-value under task i is high compared with task i's own data.
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


def drop_unrouted(candidates, routed):
    """Fewer weight-zero rows to compute: each row keeps its routed candidates first, and the columns
    past the largest routed count (unrouted for every task) are dropped."""
    order = torch.argsort((~routed).to(torch.int8), dim=1, stable=True)
    keep = order[:, : int(routed.sum(1).max())]
    return candidates.gather(1, keep), routed.gather(1, keep)


def sample_batch(buf, starts, sizes, critic, args):
    """CDS: each task's own batch plus the candidates CDS routes to it. Returns (batch, sharing stats)."""
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


def fail(message, code=2):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(args: Args):
    # TRY NOT TO MODIFY: setup, data, networks
    keep_freed_memory()
    for name in ("total_steps", "batch_size", "eval_freq", "eval_episodes", "log_freq", "checkpoint_freq", "cql_n_actions"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
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
    if n_tasks < 2:
        fail("CDS shares data between tasks: give it at least two --tasks")

    actor = Actor(n_tasks, args.hidden_dim, args.n_hidden).to(device)
    critic = TwinCritic(n_tasks, args.hidden_dim, args.n_hidden).to(device)
    critic_target = TwinCritic(n_tasks, args.hidden_dim, args.n_hidden).to(device)
    critic_target.load_state_dict(critic.state_dict())
    log_alpha = torch.zeros((), device=device, requires_grad=True)
    log_cql_alpha = torch.zeros((), device=device, requires_grad=True)
    actor_optim = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    critic_optim = torch.optim.Adam(critic.parameters(), lr=args.q_lr)
    alpha_optim = torch.optim.Adam([log_alpha], lr=args.policy_lr)
    cql_alpha_optim = torch.optim.Adam([log_cql_alpha], lr=args.q_lr)
    step, evals, wall_before = 0, [], 0.0
    if args.resume:
        try:
            ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        except Exception as e:  # a truncated or foreign file
            fail(f"--resume: cannot read the checkpoint {ckpt_path} ({type(e).__name__}: {e})")
        for module, key in ((actor, "actor"), (critic, "critic"), (critic_target, "critic_target"),
                            (actor_optim, "actor_optim"), (critic_optim, "critic_optim"),
                            (alpha_optim, "alpha_optim"), (cql_alpha_optim, "cql_alpha_optim")):
            module.load_state_dict(ckpt[key])
        with torch.no_grad():
            log_alpha.copy_(ckpt["log_alpha"])
            log_cql_alpha.copy_(ckpt["log_cql_alpha"])
        step, evals, wall_before = ckpt["step"], ckpt["evals"], ckpt["wall_time"]
        set_rng_state(ckpt["rng"])
        print(f"resumed {run_name} at step {step}")
    loss_fn = torch.compile(cql_losses) if args.compile else cql_losses

    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    print(f"{run_name}: {n_tasks} tasks, {len(data['rewards'])} transitions "
          f"({', '.join(f'{t} {s}' for t, s in zip(args.tasks, data['sizes']))}), device {device}")

    def state():
        return {"actor": actor.state_dict(), "critic": critic.state_dict(), "critic_target": critic_target.state_dict(),
                "actor_optim": actor_optim.state_dict(), "critic_optim": critic_optim.state_dict(),
                "alpha_optim": alpha_optim.state_dict(), "cql_alpha_optim": cql_alpha_optim.state_dict(),
                "log_alpha": log_alpha.detach(), "log_cql_alpha": log_cql_alpha.detach(), "step": step, "evals": evals,
                "wall_time": wall_before + time.time() - start_time, "rng": rng_state(), "args": asdict(args),
                "obs_mean": obs_mean, "obs_std": obs_std, "tasks": args.tasks}

    def run_evaluation():
        returns = evaluate(actor, args.tasks, args.eval_episodes, obs_mean, obs_std, args.seed * 100_000, device)
        result = {"step": step}
        for task in args.tasks:
            ret = float(returns[task].mean())
            result[task] = {"return": ret, "return_std": float(returns[task].std()),
                            "normalized_score": normalized_score(task, ret, reference)}
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
                   "evals": evals, "args": asdict(args)}
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
        while step < args.total_steps:
            batch, sharing = sample_batch(buf, starts, sizes, critic, args)
            losses, stats = loss_fn(actor, critic, critic_target, log_alpha, log_cql_alpha, batch, args)
            diverged |= ~torch.isfinite(torch.stack([v.detach() for v in losses.values()])).all()
            for optim in (actor_optim, critic_optim, alpha_optim):
                optim.zero_grad(set_to_none=True)
            (losses["actor"] + losses["critic"] + losses["alpha"]).backward()
            actor_optim.step()
            critic_optim.step()
            alpha_optim.step()
            if args.cql_lagrange:
                cql_alpha_optim.zero_grad(set_to_none=True)
                losses["cql_alpha"].backward()
                cql_alpha_optim.step()
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
                writer.add_scalar("losses/alpha", log_alpha.exp().item(), step)
                writer.add_scalar("losses/cql_alpha", log_cql_alpha.exp().item() if args.cql_lagrange else args.cql_alpha, step)
                for key, value in sharing.items():
                    writer.add_scalar(key, value.item(), step)
                writer.add_scalar("charts/SPS", sps, step)
                eta = (args.total_steps - step) / max(sps, 1e-9)
                last = f"{evals[-1]['average_normalized_score']:.1f} @ {evals[-1]['step']}" if evals else "none yet"
                print(f"step {step}/{args.total_steps} | SPS {sps:.1f} | critic {losses['critic'].item():.2f} "
                      f"| Q(data) {stats['q_data'].item():.1f} | last eval score {last} | ETA {eta / 3600:.1f} h", flush=True)
            if step % args.eval_freq == 0 or step == args.total_steps:
                run_evaluation()
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
