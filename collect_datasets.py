"""Make the MT-Walker2d and dm-control walker offline datasets: online SAC per task, then expert, medium and
medium-replay datasets from its checkpoints (the recipe of the CDS paper, Yu et al. 2021).

    python collect_datasets.py                       # train all three tasks side by side, then build
    python collect_datasets.py --resume              # continue an interrupted collection
    python collect_datasets.py --phase build         # (re)write the datasets from finished runs
    python collect_datasets.py --domain dmc-walker   # HCSAC's benchmark: dm-control's walker, walk and run

Phase `train` runs one process per task. Each trains SAC (2x256 networks) online, evaluates every
`eval_every` steps and keeps an actor snapshot with its return, and checkpoints everything
(networks, optimisers, replay buffer, RNG state) so `--resume` continues where it stopped.
Phase `build` reads the finished runs and writes, per task:
  expert        transitions of the final SAC policy (actions sampled from the policy, as D4RL did)
  medium        transitions of the snapshot whose return is closest to `medium_fraction` x expert
  medium-replay the replay buffer from the first step up to that medium snapshot
plus the behaviour-policy actor weights and the reference returns (random and expert policy).
The file format is described in data/README.md.
"""

import functools
import json
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Annotated

import gymnasium as gym
import numpy as np
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import tyro


@dataclass
class Args:
    phase: str = "all"
    """`train`, `build`, or `all` (train then build)"""
    domain: str = "mt-walker2d"
    """`mt-walker2d` (run_forward, run_backward, jump) or `dmc-walker` (walk, run)"""
    tasks: Annotated[tuple[str, ...], tyro.conf.arg(help_behavior_hint="(default: all of the domain's)")] = ()
    """the tasks to train a behaviour policy for, each in its own process"""
    seed: int = 0
    """task k of the domain's task list uses seed + k"""
    total_steps: int = 300_000
    """environment steps (= SAC gradient updates after learning_starts) per task"""
    learning_starts: int = 5_000
    """uniformly random actions before the first update"""
    batch_size: int = 256
    """SAC minibatch"""
    lr: float = 3e-4
    """Adam learning rate of actor, critics and entropy temperature"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    eval_every: int = 10_000
    """steps between evaluations (each keeps an actor snapshot with its return)"""
    eval_episodes: int = 5
    """episodes per evaluation, actions sampled from the policy as in the datasets"""
    checkpoint_every: int = 10_000
    """steps between checkpoints of the whole training state"""
    resume: bool = False
    """continue the training runs found in work_dir"""
    work_dir: str = "collect_runs"
    """checkpoints, snapshots and logs of the SAC runs, one folder per task (not shipped)"""
    out_dir: Annotated[str, tyro.conf.arg(help_behavior_hint="(default: the domain's data folder)")] = ""
    """where `build` writes datasets, actor weights and reference returns"""
    datasets: Annotated[tuple[str, ...], tyro.conf.arg(help_behavior_hint="(default: the mixtures' files)")] = ()
    """which task/kind datasets `build` writes"""
    expert_size: int = 5_000
    """transitions in each expert dataset"""
    medium_size: int = 30_000
    """transitions in each medium dataset"""
    medium_fraction: float = 0.4
    """the medium snapshot aims at this fraction of the expert data's return ..."""
    medium_range: tuple[float, float] = (1 / 3, 1 / 2)
    """... and is accepted when its own data's return lands in this range of fractions"""
    medium_candidates: int = 8
    """snapshots tried for the medium level, closest evaluation to the target first"""
    medium_replay_size: int = 100_000
    """medium-replay: whole episodes of the replay buffer up to the medium snapshot, drawn at random
    (in time order) until about this many transitions (the paper's: ~110k); 0 keeps the whole buffer"""
    reference_episodes: int = 20
    """episodes for the reference returns (random policy; expert policy with its mean action)"""
    threads: int = 1
    """torch threads per process"""


# ---------------------------------------------------------------- the MT-Walker2d task suite
# (the same definitions are copied into every training script; tests/test_parity.py pins them)
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


# ---------------------------------------------------------------- dm-control's walker (HCSAC's benchmark)
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


class DmcWalker(gym.Wrapper):
    """make_dmc_env's walker; info adds what the relabelling needs stored: the x-speed of the torso's subtree centre
    of mass at s' (the training scripts' environments leave it out: they only evaluate)."""

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        info = info | {"horizontal_velocity": self.env.unwrapped.physics.horizontal_velocity()}
        return obs, reward, terminated, truncated, info


def make_dmc_collect_env(task):
    return DmcWalker(make_dmc_env(task))


COLLECT = {  # domain: (tasks, make_env(task), observation size, info fields stored per transition, data folder,
    # the datasets its shipped mixtures need)
    "mt-walker2d": (WALKER_TASKS, make_env, 17, ("x_velocity",), "data", (
        "run_forward/medium-replay", "run_backward/medium", "jump/expert", "run_forward/medium", "jump/medium")),
    "dmc-walker": (("walk", "run"), make_dmc_collect_env, 24, ("horizontal_velocity",), "data/dmc-walker", (
        "walk/medium", "walk/medium-replay", "run/medium", "run/medium-replay")),
}  # fmt: skip


# ---------------------------------------------------------------- SAC (2x256, as is usual)
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class Actor(nn.Module):
    """Tanh-Gaussian policy; the saved behaviour-policy weights are this module's state_dict."""

    def __init__(self, obs_dim=17, act_dim=6, hidden=256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.mean = nn.Linear(hidden, act_dim)
        self.log_std = nn.Linear(hidden, act_dim)

    def forward(self, obs):
        h = self.net(obs)
        return self.mean(h), self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(self, obs):
        mean, log_std = self(obs)
        normal = torch.distributions.Normal(mean, log_std.exp())
        u = normal.rsample()
        action = torch.tanh(u)
        log_prob = normal.log_prob(u).sum(-1) - (2 * (np.log(2) - u - F.softplus(-2 * u))).sum(-1)
        return action, log_prob

    @torch.no_grad()
    def act(self, obs, deterministic=False):
        obs = torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0)
        action = torch.tanh(self(obs)[0]) if deterministic else self.sample(obs)[0]
        return action[0].numpy()


class Critic(nn.Module):
    def __init__(self, obs_dim=17, act_dim=6, hidden=256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(obs_dim + act_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, obs, action):
        return self.net(torch.cat([obs, action], -1)).squeeze(-1)


BUFFER_KEYS = ("observations", "actions", "next_observations", "rewards", "terminals", "timeouts")


def new_buffer(size, obs_dim=17, fields=("x_velocity",)):
    buffer = {
        "observations": np.zeros((size, obs_dim), np.float32),
        "actions": np.zeros((size, 6), np.float32),
        "next_observations": np.zeros((size, obs_dim), np.float32),
        "rewards": np.zeros(size, np.float32),
        "terminals": np.zeros(size, bool),
        "timeouts": np.zeros(size, bool),
    }
    return buffer | {field: np.zeros(size, np.float32) for field in fields}


def run_episodes(env, policy, n_episodes=None, n_steps=None, seed=0, fields=("x_velocity",)):
    """Roll out `policy(obs)`; stop after n_episodes episodes or exactly n_steps transitions."""
    data, returns, ep_return = {k: [] for k in BUFFER_KEYS + fields}, [], 0.0
    obs, _ = env.reset(seed=seed)
    while True:
        action = policy(obs)
        next_obs, reward, terminated, truncated, info = env.step(action)
        values = (obs, action, next_obs, reward, terminated, truncated, *(info[f] for f in fields))
        for key, value in zip(BUFFER_KEYS + fields, values):
            data[key].append(value)
        ep_return += reward
        obs = next_obs
        if n_steps is not None and len(data["rewards"]) == n_steps:
            data["timeouts"][-1] = data["timeouts"][-1] or not terminated  # a cut episode is a truncation
            if terminated or truncated:
                returns.append(ep_return)
            break
        if terminated or truncated:
            returns.append(ep_return)
            ep_return = 0.0
            if n_episodes is not None and len(returns) == n_episodes:
                break
            obs, _ = env.reset()
    dtypes = {"terminals": bool, "timeouts": bool}
    return {k: np.asarray(v, dtype=dtypes.get(k, np.float32)) for k, v in data.items()}, np.asarray(returns)


def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def sac_networks(args, obs_dim=17):
    """The SAC learner: actor, twin critics and their targets, optimisers, entropy temperature (all checkpointed)."""
    nets = {"actor": Actor(obs_dim), "qf1": Critic(obs_dim), "qf2": Critic(obs_dim)}
    nets |= {"qf1_target": Critic(obs_dim), "qf2_target": Critic(obs_dim)}
    nets["qf1_target"].load_state_dict(nets["qf1"].state_dict())
    nets["qf2_target"].load_state_dict(nets["qf2"].state_dict())
    critic_params = list(nets["qf1"].parameters()) + list(nets["qf2"].parameters())
    nets["q_optim"] = torch.optim.Adam(critic_params, lr=args.lr)
    nets["actor_optim"] = torch.optim.Adam(nets["actor"].parameters(), lr=args.lr)
    log_alpha = torch.zeros(1, requires_grad=True)
    nets["alpha_optim"] = torch.optim.Adam([log_alpha], lr=args.lr)
    return nets, log_alpha


def sac_update(nets, log_alpha, b, args, target_entropy=-6.0):
    """One SAC gradient step on the batch b: critics, then actor, then temperature, then the targets."""
    qf1, qf2, actor = nets["qf1"], nets["qf2"], nets["actor"]
    alpha = log_alpha.exp().detach()
    with torch.no_grad():
        next_action, next_log_prob = actor.sample(b["next_observations"])
        next_q1 = nets["qf1_target"](b["next_observations"], next_action)
        next_q = torch.min(next_q1, nets["qf2_target"](b["next_observations"], next_action)) - alpha * next_log_prob
        target = b["rewards"] + args.gamma * (1.0 - b["terminals"].float()) * next_q
    q_loss = F.mse_loss(qf1(b["observations"], b["actions"]), target)
    q_loss = q_loss + F.mse_loss(qf2(b["observations"], b["actions"]), target)
    nets["q_optim"].zero_grad()
    q_loss.backward()
    nets["q_optim"].step()

    new_action, log_prob = actor.sample(b["observations"])
    q_new = torch.min(qf1(b["observations"], new_action), qf2(b["observations"], new_action))
    actor_loss = (alpha * log_prob - q_new).mean()
    nets["actor_optim"].zero_grad()
    actor_loss.backward()
    nets["actor_optim"].step()
    alpha_loss = -(log_alpha.exp() * (log_prob.detach() + target_entropy)).mean()
    nets["alpha_optim"].zero_grad()
    alpha_loss.backward()
    nets["alpha_optim"].step()
    with torch.no_grad():
        for net, tgt in ((qf1, nets["qf1_target"]), (qf2, nets["qf2_target"])):
            for p, tp in zip(net.parameters(), tgt.parameters()):
                tp.mul_(1 - args.tau).add_(args.tau * p)


def resume_sac(ckpt_path, nets, log_alpha, buffer, task):
    """Restore a train_task checkpoint into nets, log_alpha and buffer; returns (step, evals)."""
    ckpt = torch.load(ckpt_path, weights_only=False)
    for key, module in nets.items():
        module.load_state_dict(ckpt[key])
    with torch.no_grad():
        log_alpha.copy_(ckpt["log_alpha"])
    step, evals = ckpt["step"], ckpt["evals"]
    for key in buffer:
        buffer[key][:step] = ckpt["buffer"][key]
    if step > 0 and not (buffer["terminals"][step - 1] or buffer["timeouts"][step - 1]):
        buffer["timeouts"][step - 1] = True  # the episode in progress was cut by the interruption
    np.random.set_state(ckpt["numpy_rng"])
    torch.set_rng_state(ckpt["torch_rng"])
    random.setstate(ckpt["python_rng"])
    print(f"[{task}] resumed at step {step}", flush=True)
    return step, evals


def save_sac(ckpt_path, nets, log_alpha, buffer, step, evals, args, task, seed):
    state = {key: module.state_dict() for key, module in nets.items()}
    state |= {"log_alpha": log_alpha.detach().clone(), "step": step, "evals": evals,
              "buffer": {k: v[:step] for k, v in buffer.items()}, "numpy_rng": np.random.get_state(),
              "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "args": asdict(args),
              "task": task, "seed": seed}  # fmt: skip
    save_atomic(state, ckpt_path)


def evaluate_snapshot(eval_env, actor, step, run_dir, evals, args, task, start, start_step):
    """Evaluate the actor, keep its weights as a snapshot with its return, and print progress."""
    fields = COLLECT[args.domain][3]
    _, returns = run_episodes(eval_env, actor.act, n_episodes=args.eval_episodes, seed=10_000 + step, fields=fields)
    snapshot = os.path.join(run_dir, "snapshots", f"actor_{step:07d}.pt")
    torch.save(actor.state_dict(), snapshot)
    evals.append({"step": step, "return_mean": float(returns.mean()), "return_std": float(returns.std()),
                  "snapshot": snapshot})  # fmt: skip
    sps = (step - start_step) / (time.time() - start)
    eta = (args.total_steps - step) / max(sps, 1e-9) / 60
    print(f"[{task}] step {step} return {returns.mean():.1f} ± {returns.std():.1f} SPS {sps:.0f} ETA {eta:.0f} min",
          flush=True)  # fmt: skip
    with open(os.path.join(run_dir, "evals.json"), "w") as f:
        json.dump(evals, f, indent=1)


def train_task(args: Args, task: str, seed: int):
    """Online SAC on one task, checkpointed; keeps an actor snapshot at every evaluation."""
    torch.set_num_threads(args.threads)
    run_dir = os.path.join(args.work_dir, task)
    os.makedirs(os.path.join(run_dir, "snapshots"), exist_ok=True)
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    _, make, obs_dim, fields, _, _ = COLLECT[args.domain]
    env, eval_env = make(task), make(task)
    env.action_space.seed(seed)
    nets, log_alpha = sac_networks(args, obs_dim)
    buffer, step, evals = new_buffer(args.total_steps, obs_dim, fields), 0, []
    if os.path.exists(ckpt_path):
        if not args.resume:
            raise SystemExit(f"error: {ckpt_path} exists; pass --resume to continue it or remove {args.work_dir}")
        step, evals = resume_sac(ckpt_path, nets, log_alpha, buffer, task)
    if step >= args.total_steps:
        print(f"[{task}] already finished ({step} steps)", flush=True)
        return

    actor = nets["actor"]
    obs, _ = env.reset(seed=seed + 1000 * step)
    start, start_step = time.time(), step
    while step < args.total_steps:
        action = env.action_space.sample() if step < args.learning_starts else actor.act(obs)
        next_obs, reward, terminated, truncated, info = env.step(action)
        values = (obs, action, next_obs, reward, terminated, truncated, *(info[f] for f in fields))
        for key, value in zip(BUFFER_KEYS + fields, values):
            buffer[key][step] = value
        step += 1
        obs = next_obs
        if terminated or truncated:
            obs, _ = env.reset()
        if step >= args.learning_starts:
            idx = np.random.randint(0, step, args.batch_size)
            sac_update(nets, log_alpha, {k: torch.as_tensor(buffer[k][idx]) for k in BUFFER_KEYS}, args)
        if step % args.eval_every == 0:
            evaluate_snapshot(eval_env, actor, step, run_dir, evals, args, task, start, start_step)
        if step % args.checkpoint_every == 0 or step == args.total_steps:
            if not (buffer["terminals"][step - 1] or buffer["timeouts"][step - 1]) and step == args.total_steps:
                buffer["timeouts"][step - 1] = True  # training ends mid-episode
            save_sac(ckpt_path, nets, log_alpha, buffer, step, evals, args, task, seed)
    print(f"[{task}] finished {step} steps", flush=True)


def build_task(args: Args, task: str, seed: int):
    """Write the datasets, behaviour-policy weights and reference returns of one finished task."""
    run_dir = os.path.join(args.work_dir, task)
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    if ckpt["step"] < args.total_steps:
        raise SystemExit(
            f"error: {task} has trained {ckpt['step']} of {args.total_steps} steps; run --phase train --resume"
        )
    torch.manual_seed(seed)  # the datasets' sampled actions
    _, make, obs_dim, fields, _, _ = COLLECT[args.domain]
    env = make(task)
    rollout = functools.partial(run_episodes, env, fields=fields)
    expert = Actor(obs_dim)
    expert.load_state_dict(ckpt["actor"])
    # reference returns: a uniformly random policy, and the expert with its mean action (as evaluation uses)
    _, random_returns = rollout(lambda o: env.action_space.sample(), n_episodes=args.reference_episodes, seed=seed + 1)
    _, expert_returns = rollout(
        lambda o: expert.act(o, deterministic=True), n_episodes=args.reference_episodes, seed=seed + 2
    )
    # expert data come from the final policy; its sampled-action return sets the medium target
    expert_data, expert_data_returns = rollout(expert.act, n_steps=args.expert_size, seed=seed + 3)
    # medium: the training evaluations (few episodes) are noisy, so the snapshots closest to the target
    # are tried in turn; the first whose dataset return lands within medium_range of the expert data's
    # is kept (else the closest of those tried)
    expert_mean, (low, high) = expert_data_returns.mean(), args.medium_range
    target = args.medium_fraction * expert_mean
    evals = [e for e in ckpt["evals"] if e["step"] < ckpt["step"]]
    tried = []
    for candidate in sorted(evals, key=lambda e: abs(e["return_mean"] - target))[: args.medium_candidates]:
        actor = Actor(obs_dim)
        actor.load_state_dict(torch.load(candidate["snapshot"], weights_only=True))
        data, _ = rollout(actor.act, n_steps=args.medium_size, seed=seed + 4)
        fraction = episode_returns(data).mean() / expert_mean
        tried.append((fraction, candidate, actor, data))
        print(
            f"[{task}] medium candidate at step {candidate['step']}: {fraction:.0%} of the expert's return", flush=True
        )
        if low <= fraction <= high:
            break
    fraction, medium_eval, medium, medium_data = min(
        tried, key=lambda t: (not low <= t[0] <= high, abs(t[0] - args.medium_fraction))
    )
    replay = {k: v[: medium_eval["step"]].copy() for k, v in ckpt["buffer"].items() if k in BUFFER_KEYS + fields}
    last = medium_eval["step"] - 1
    replay["timeouts"][last] = replay["timeouts"][last] or not replay["terminals"][last]
    replay = subsample_episodes(replay, args.medium_replay_size, seed + 5)
    os.makedirs(os.path.join(args.out_dir, "policies"), exist_ok=True)
    torch.save(expert.state_dict(), os.path.join(args.out_dir, "policies", f"{task}_expert_actor.pt"))
    torch.save(medium.state_dict(), os.path.join(args.out_dir, "policies", f"{task}_medium_actor.pt"))
    info = {
        "task": task,
        "seed": seed,
        "sac_steps": ckpt["step"],
        "medium_snapshot_step": medium_eval["step"],
        "medium_fraction_of_expert_data": float(fraction),
        "random_return": float(random_returns.mean()),
        "expert_return": float(expert_returns.mean()),
        "random_return_std": float(random_returns.std()),
        "expert_return_std": float(expert_returns.std()),
        "datasets": {},
    }
    for kind, data in (("expert", expert_data), ("medium", medium_data), ("medium-replay", replay)):
        returns = episode_returns(data)
        info["datasets"][kind] = {
            "transitions": int(len(data["rewards"])),
            "episodes": len(returns),
            "return_mean": float(np.mean(returns)),
            "return_std": float(np.std(returns)),
        }
        if f"{task}/{kind}" in args.datasets:
            path = os.path.join(args.out_dir, f"{task}_{kind.replace('-', '_')}.npz")
            np.savez_compressed(path, task=np.array(task), domain=np.array(args.domain), **data)
            print(f"[{task}] wrote {path}: {info['datasets'][kind]}", flush=True)
    return info


def subsample_episodes(data, size, seed):
    """Whole episodes drawn at random (kept in time order) until about `size` transitions; 0 keeps all."""
    if size <= 0 or len(data["rewards"]) <= size:
        return data
    ends = np.flatnonzero(data["terminals"] | data["timeouts"])
    starts = np.concatenate([[0], ends[:-1] + 1])
    chosen, total = [], 0
    for k in np.random.default_rng(seed).permutation(len(ends)):
        if total + ends[k] - starts[k] + 1 > size:
            continue
        chosen.append(k)
        total += ends[k] - starts[k] + 1
    rows = np.concatenate([np.arange(starts[k], ends[k] + 1) for k in sorted(chosen)])
    return {key: value[rows] for key, value in data.items()}


def episode_returns(data, max_steps=1000):
    """Returns of the complete episodes: those ending in a terminal or at the time limit.

    An episode cut short (end of a file, an interrupted collection) is a truncation for training
    but is left out of these statistics.
    """
    ends = np.flatnonzero(data["terminals"] | data["timeouts"])
    sums = np.cumsum(data["rewards"], dtype=np.float64)[ends]
    returns = np.diff(np.concatenate([[0.0], sums]))
    lengths = np.diff(np.concatenate([[-1], ends]))
    complete = data["terminals"][ends] | (lengths == max_steps)
    return returns[complete]


def main(args: Args):
    if args.domain not in COLLECT:
        raise SystemExit(f"error: unknown domain {args.domain!r}; choose from {', '.join(COLLECT)}")
    tasks, make, _, _, out_dir, datasets = COLLECT[args.domain]
    args.tasks, args.out_dir, args.datasets = args.tasks or tasks, args.out_dir or out_dir, args.datasets or datasets
    for task in args.tasks:
        if task not in tasks:
            raise SystemExit(f"error: unknown task {task!r}; choose from {', '.join(tasks)}")
    try:
        make(args.tasks[0]).close()
    except ImportError as e:
        raise SystemExit(f"error: {e}") from None
    seeds = {task: args.seed + tasks.index(task) for task in args.tasks}
    if args.phase in ("train", "all"):
        procs = [mp.Process(target=train_task, args=(args, task, seeds[task])) for task in args.tasks]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise SystemExit("error: a training process failed; fix it and rerun with --resume")
    if args.phase in ("build", "all"):
        os.makedirs(args.out_dir, exist_ok=True)
        infos = {task: build_task(args, task, seeds[task]) for task in args.tasks}
        path = os.path.join(args.out_dir, "reference.json")
        with open(path, "w") as f:
            json.dump({"collection_args": asdict(args), "tasks": infos}, f, indent=2)
        print(f"wrote {path}")


if __name__ == "__main__":
    main(tyro.cli(Args))
