"""Make the multi-goal PointMaze offline datasets: the CDS paper's AntMaze protocol (Yu et al. 2021,
https://arxiv.org/abs/2109.08128) on Gymnasium-Robotics' PointMaze, with a scripted controller instead of a policy.

    python collect_maze.py                 # both domains, both mixtures, into data/maze-medium/ and data/maze-large/
    python collect_maze.py --overwrite     # redo the files that are already there
    python collect_maze.py --domains antmaze-medium   # convert D4RL's AntMaze data, downloaded with Minari (below)

The controller: breadth-first search over the maze's free cells gives the next cell on a shortest path to the goal
cell; a PD law steers toward that cell's centre (in the goal cell: toward the goal point), plus Gaussian action noise.
Per domain and task it writes two mixtures (data/README.md):
  undirected  episodes from random free cells toward random free cells, a new random goal each time one is reached,
              for the whole time limit (D4RL's "diverse"); task i's file holds every k-th episode
  directed    episodes from the start cell MAZE_START toward task i's goal, ending there or at the time limit
Every file carries the rewards and terminals of its own task. Also written: reference.json (success rates of a
uniformly random policy and of the noiseless controller: the 0 and 100 of a normalised score) and provenance.json.
A file whose recorded settings match the flags is kept, so an interrupted collection continues where it stopped.

AntMaze (antmaze-medium, antmaze-large): the paper's own data, D4RL's AntMaze "diverse" datasets as Minari publishes
them (`minari download D4RL/antmaze/medium-diverse-v1`, about 1M transitions), converted into the same per-task files
(never shipped: data/antmaze-*/ is ignored by git). Each episode runs 1,000 steps toward one commanded goal (its
desired_goal, the centre of a goal cell plus noise); the observation is the ant's (x, y) then its 27 numbers.
  directed    task k's file holds the episodes commanded to goal cell k; an episode commanded to another cell (the
              maps' goal cells include the start cell (1, 1)) goes to no task, and the count is printed
  undirected  every episode, dealt out evenly among the tasks in a seeded random order
Rewards and terminals are relabelled from the ant's (x, y) at s' with the environment's compute_reward: 1 within 0.45
of the task's goal-cell centre. reference.json holds D4RL's AntMaze normalisation (0 and 1: a score is a success %).
"""

import contextlib
import io
import json
import math
import os
import sys
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass
from typing import Annotated

import gymnasium as gym
import numpy as np
import tyro

DIVERSE = tyro.conf.arg(help_behavior_hint="(default: D4RL/antmaze/<maze>-diverse-v1)")


@dataclass
class Args:
    domains: tuple[str, ...] = ("maze-medium", "maze-large")  # the domains to make (keys of MAZES; antmaze-*: convert)
    mixtures: tuple[str, ...] = ("undirected", "directed")  # the mixtures to collect per domain
    seed: int = 0  # every file draws from its own stream, np.random.default_rng((seed, domain, mixture, task))
    medium_size: int = 40_000  # maze-medium: transitions per file, rounded up to whole episodes
    large_size: int = 20_000  # maze-large: transitions per file, rounded up to whole episodes
    kp: float = 4.0  # controller: action per metre of position error toward the waypoint
    kd: float = 0.4  # controller: action per m/s of velocity (damping)
    noise: float = 0.5  # std of the Gaussian noise added to the controller's action (then clipped to [-1, 1])
    reference_episodes: int = 50  # episodes per task for each reference success rate (random, noiseless, noisy)
    out_dir: str = "data"  # the files go to <out_dir>/<domain>/
    minari_dataset: Annotated[str, DIVERSE] = ""  # antmaze-*: the Minari dataset to convert
    overwrite: bool = False  # redo files whose recorded settings match the flags (otherwise they are kept)


MIXTURES = ("undirected", "directed")
LIMITS = {"seed": "[0, 4294967295]", "medium_size": "[1, inf)", "large_size": "[1, inf)", "kp": "(0, inf)",
          "kd": "[0, inf)", "noise": "[0, inf)", "reference_episodes": "[1, inf)"}  # fmt: skip


# ---------------------------------------------------------------- the maze task suite
# (the same definitions are copied into every training script; the parity tests pin them)
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


def maze_rewards(domain, tasks, next_obs):
    """Rewards = terminals of every task: 1 where s' lies within GOAL_RADIUS of the task's goal. (N, len(tasks))."""
    goals = np.stack([goal_xy(domain, t) for t in tasks])
    return np.linalg.norm(next_obs[:, None, :2] - goals[None], axis=-1) <= GOAL_RADIUS


def maze_tasks(domain):
    return tuple(f"goal_{k}" for k in range(len(MAZES[domain][2])))


# ---------------------------------------------------------------- the scripted controller
class MazeController:
    """Shortest path over the free cells, then PD toward the next cell's centre (the goal point in the goal cell)."""

    def __init__(self, maze, kp, kd):
        self.maze, self.kp, self.kd = maze, kp, kd  # maze: the environment's `unwrapped.maze`
        self.free = {(r, c) for r, row in enumerate(maze.maze_map) for c, cell in enumerate(row) if cell != 1}
        self.steps_to = {}  # goal cell -> {cell: moves to the goal cell}, by breadth-first search from the goal

    def distances(self, goal_cell):
        if goal_cell not in self.steps_to:
            steps, queue = {goal_cell: 0}, deque([goal_cell])
            while queue:
                cell = queue.popleft()
                for near in neighbours(cell):
                    if near in self.free and near not in steps:
                        steps[near] = steps[cell] + 1
                        queue.append(near)
            self.steps_to[goal_cell] = steps
        return self.steps_to[goal_cell]

    def waypoint(self, xy, goal_cell, goal):
        steps = self.distances(goal_cell)
        cell = tuple(int(i) for i in self.maze.cell_xy_to_rowcol(xy))
        if cell == goal_cell:
            return goal
        return self.maze.cell_rowcol_to_xy(np.array(min(neighbours(cell), key=lambda c: steps.get(c, math.inf))))

    def __call__(self, obs, goal_cell, goal):
        """a = kp (waypoint - position) - kd velocity, clipped to [-1, 1]."""
        target = self.waypoint(obs[:2], goal_cell, goal)
        return np.clip(self.kp * (target - obs[:2]) - self.kd * obs[2:], -1.0, 1.0)


def neighbours(cell):
    row, col = cell
    return (row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1)


def noisy(action, noise, rng):
    return np.clip(action + noise * rng.standard_normal(2), -1.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------- the two mixtures
def directed_episode(env, controller, noise, rng):
    """One episode of the task's environment from MAZE_START: (obs, actions, next_obs, ends) lists."""
    obs, _ = env.reset(seed=int(rng.integers(2**31)))
    goal_cell, goal = tuple(int(i) for i in env.goal_cell), env.goal
    steps = {"observations": [], "actions": [], "next_observations": [], "ends": []}
    done = False
    while not done:
        action = noisy(controller(obs, goal_cell, goal), noise, rng)
        next_obs, _, terminated, truncated, _ = env.step(action)
        done = terminated or truncated
        for key, value in zip(steps, (obs, action, next_obs, done)):
            steps[key].append(value)
        obs = next_obs
    return steps


def undirected_episode(env, controller, noise, rng):
    """One episode from a random free cell toward random free cells, re-targeted on arrival, until the time limit.
    Returns the steps and the number of goals reached."""
    cells = sorted(controller.free)
    start, target = (cells[i] for i in rng.choice(len(cells), 2, replace=False))
    options = {"reset_cell": np.array(start), "goal_cell": np.array(target)}
    obs = env.reset(seed=int(rng.integers(2**31)), options=options)[0]["observation"]
    steps = {"observations": [], "actions": [], "next_observations": [], "ends": []}
    done, reached = False, 0
    while not done:
        goal = env.unwrapped.maze.cell_rowcol_to_xy(np.array(target))
        action = noisy(controller(obs, target, goal), noise, rng)
        next_obs, _, terminated, truncated, _ = env.step(action)
        next_obs, done = next_obs["observation"], terminated or truncated
        for key, value in zip(steps, (obs, action, next_obs, done)):
            steps[key].append(value)
        obs = next_obs
        if np.linalg.norm(obs[:2] - goal) <= GOAL_RADIUS:
            reached += 1
            others = [c for c in cells if c != target]
            target = others[rng.integers(len(others))]
    return steps, reached


def undirected_episodes(args, domain, d, size):
    """One stream of episodes dealt out to the tasks in turn: task k's file holds episodes k, k + K, k + 2K, ..."""
    env, tasks = continuing_maze_env(domain), maze_tasks(domain)
    controller, rng = MazeController(env.unwrapped.maze, args.kp, args.kd), np.random.default_rng((args.seed, d, 0))
    per_task = math.ceil(size / env.spec.max_episode_steps)  # every episode runs to the time limit
    runs = [undirected_episode(env, controller, args.noise, rng) for _ in range(len(tasks) * per_task)]
    episodes = {task: [steps for steps, _ in runs[k :: len(tasks)]] for k, task in enumerate(tasks)}
    reached = {t: {"goals_reached_per_episode": float(np.mean([r for _, r in runs[k :: len(tasks)]]))}
               for k, t in enumerate(tasks)}  # fmt: skip
    return episodes, reached


def directed_episodes(args, domain, d, size):
    """Per task, whole episodes from MAZE_START toward its goal until the file holds at least `size` transitions."""
    episodes = {}
    for k, task in enumerate(maze_tasks(domain)):
        env, rng = make_maze_env(domain, task), np.random.default_rng((args.seed, d, 1, k))
        controller, episodes[task], n = MazeController(env.unwrapped.maze, args.kp, args.kd), [], 0
        while n < size:
            episodes[task].append(directed_episode(env, controller, args.noise, rng))
            n += len(episodes[task][-1]["ends"])
    return episodes, {}


def continuing_maze_env(domain):
    """The domain's PointMaze that never terminates (the goal is the controller's business), truncated at the limit."""
    make_maze_env(domain, "goal_0")  # registers the environments
    env = gym.make(MAZES[domain][0], continuing_task=True, reset_target=False)
    os.remove(env.unwrapped.tmp_xml_file_path)  # as make_maze_env does
    return env


def as_dataset(domain, task, episodes):
    """Stack episodes into the file's arrays, with the task's rewards and terminals relabelled from s'."""
    data = {key: np.concatenate([np.asarray(e[key]) for e in episodes]) for key in episodes[0]}
    data = {k: v.astype(np.float32) if k != "ends" else v.astype(bool) for k, v in data.items()}
    ends = data.pop("ends")
    data["terminals"] = maze_rewards(domain, [task], data["next_observations"])[:, 0]
    data["rewards"] = data["terminals"].astype(np.float32)
    data["timeouts"] = ends & ~data["terminals"]  # the episode ended without success: the time limit
    return {"domain": np.array(domain), "task": np.array(task), **data}


def episode_starts(data):
    """Index of each episode's first step: where s differs from the previous step's s'."""
    new = np.any(data["observations"][1:] != data["next_observations"][:-1], axis=1)
    return np.concatenate([[0], 1 + np.flatnonzero(new)])


def episode_stats(data):
    """Episodes, their lengths, and the fraction of them that reached the task's goal (a terminal anywhere)."""
    starts = episode_starts(data)
    lengths = np.diff(np.append(starts, len(data["terminals"])))
    success = np.logical_or.reduceat(data["terminals"], starts)
    return {"episodes": len(starts), "length_mean": float(lengths.mean()), "length_min": int(lengths.min()),
            "length_max": int(lengths.max()), "success_rate": float(success.mean())}  # fmt: skip


# ---------------------------------------------------------------- reference success rates
def success_rate(env, policy, episodes, rng):
    """Mean episode return (= fraction of episodes ending on the goal) and mean steps of the successful ones."""
    returns, steps = [], []
    for _ in range(episodes):
        obs, _ = env.reset(seed=int(rng.integers(2**31)))
        total, done, t = 0.0, False, 0
        while not done:
            obs, reward, terminated, truncated, _ = env.step(policy(obs))
            total, done, t = total + reward, terminated or truncated, t + 1
        returns.append(total)
        steps += [t] if terminated else []
    return float(np.mean(returns)), float(np.std(returns)), float(np.mean(steps)) if steps else math.nan


def reference(args, domain, d):
    """Per task: success of uniformly random actions (0), the noiseless controller (100) and the noisy controller."""
    out = {}
    for k, task in enumerate(maze_tasks(domain)):
        env, rng = make_maze_env(domain, task), np.random.default_rng((args.seed, d, len(MIXTURES), k))
        controller, cell, goal = MazeController(env.unwrapped.maze, args.kp, args.kd), MAZES[domain][2][k], env.goal
        n = args.reference_episodes
        random_policy = lambda obs: rng.uniform(-1, 1, 2).astype(np.float32)
        random_mean, random_std, _ = success_rate(env, random_policy, n, rng)
        expert_mean, expert_std, expert_steps = success_rate(env, lambda obs: controller(obs, cell, goal), n, rng)
        noisy_policy = lambda obs: noisy(controller(obs, cell, goal), args.noise, rng)
        noisy_mean, noisy_std, noisy_steps = success_rate(env, noisy_policy, n, rng)
        out[task] = {"task": task, "goal_cell": list(cell), "goal_xy": goal.tolist(), "episodes": n,
                     "random_return": random_mean, "expert_return": expert_mean, "noisy_return": noisy_mean,
                     "random_return_std": random_std, "expert_return_std": expert_std, "noisy_return_std": noisy_std,
                     "expert_steps_to_goal": expert_steps, "noisy_steps_to_goal": noisy_steps}  # fmt: skip
        print(
            f"{domain} {task}: success random {random_mean:.2f}, controller {expert_mean:.2f}, noisy {noisy_mean:.2f}"
        )
    return out


# ---------------------------------------------------------------- collection
def collect_domain(args, domain, d):
    folder = os.path.join(args.out_dir, domain)
    os.makedirs(folder, exist_ok=True)
    prov_path = os.path.join(folder, "provenance.json")
    old = json.load(open(prov_path)) if os.path.exists(prov_path) else {}
    prov = {"command": command(), "collection_args": asdict(args), "files": old.get("files", {})}
    tasks, size = maze_tasks(domain), {"maze-medium": args.medium_size, "maze-large": args.large_size}[domain]
    for m, mixture in enumerate(MIXTURES):
        if mixture not in args.mixtures:
            continue
        settings = {"seed": args.seed, "kp": args.kp, "kd": args.kd, "noise": args.noise, "size": size}
        names = [f"{mixture}_{task}.npz" for task in tasks]
        kept = [
            os.path.exists(os.path.join(folder, n)) and prov["files"].get(n, {}).get("settings") == settings
            for n in names
        ]
        if all(kept) and not args.overwrite:
            print(f"{domain} {mixture}: kept (the recorded settings match; --overwrite redoes them)")
            continue
        start = time.time()
        collect = undirected_episodes if mixture == "undirected" else directed_episodes
        episodes, reached = collect(args, domain, d, size)
        for k, (task, name) in enumerate(zip(tasks, names)):
            data = as_dataset(domain, task, episodes[task])
            path = os.path.join(folder, name)
            np.savez_compressed(path, **data)
            rng = [args.seed, d, m] + ([k] if mixture == "directed" else [])
            entry = {"mixture": mixture, "task": task, "goal_cell": list(MAZES[domain][2][k]), "settings": settings,
                     "rng": rng, "command": command(), "transitions": len(data["terminals"]), **episode_stats(data),
                     "bytes": os.path.getsize(path)} | reached.get(task, {})  # fmt: skip
            prov["files"][name] = entry
            print(f"wrote {path}: {entry['transitions']} transitions, {entry['episodes']} episodes, "
                  f"success {entry['success_rate']:.2f}")  # fmt: skip
        prov["files"] = dict(sorted(prov["files"].items()))
        json.dump(prov, open(prov_path, "w"), indent=2)
        print(f"{domain} {mixture}: {time.time() - start:.0f} s")
    write_reference(args, domain, d, folder, prov, prov_path)


# ---------------------------------------------------------------- AntMaze: D4RL's data, from Minari
MINARI = {"antmaze-medium": "D4RL/antmaze/medium-diverse-v1", "antmaze-large": "D4RL/antmaze/large-diverse-v1"}


def cell_of(domain, xy):
    """(row, col) of the maze cell holding the point xy: goal_xy's placement, inverted."""
    _, (rows, cols), _, size = MAZES[domain]
    return int(np.floor(rows / 2 - xy[1] / size)), int(np.floor(xy[0] / size + cols / 2))


def load_minari(args, domain):
    """The domain's downloaded Minari dataset, checked to be recorded in the domain's environment."""
    try:
        import minari
    except ImportError:
        fail("converting AntMaze data needs Minari: pip install 'minari[hdf5]'")
    dataset_id, env_id = args.minari_dataset or MINARI[domain], MAZES[domain][0]
    try:
        dataset = minari.load_dataset(dataset_id)
    except FileNotFoundError:
        fail(f"{dataset_id} is not downloaded; get it with: minari download {dataset_id}")
    recorded = dataset.spec.env_spec.id if dataset.spec.env_spec else "no environment"
    if recorded.split("-v")[0] != env_id.split("-v")[0]:  # the maze decides; the version is evaluation's business
        fail(f"{dataset_id} was recorded in {recorded}, not {env_id}: it is not {domain}'s data")
    return dataset_id, dataset


def split_episodes(args, domain, dataset):
    """Each episode as transitions, into the directed and undirected mixtures' per-task lists."""
    tasks, goals = maze_tasks(domain), MAZES[domain][2]
    split = {mixture: {task: [] for task in tasks} for mixture in MIXTURES}
    rng = np.random.default_rng((args.seed, list(MAZES).index(domain)))
    deal = rng.permutation(dataset.total_episodes) % len(tasks)  # undirected: as many episodes for each task
    elsewhere, moved, read, start = {}, 0, 0, time.time()
    for i, episode in enumerate(dataset.iterate_episodes()):
        obs = episode.observations
        states = np.concatenate([obs["achieved_goal"], obs["observation"]], 1)  # (T + 1, 29)
        ends = np.arange(len(episode.actions)) == len(episode.actions) - 1
        part = {"observations": states[:-1], "actions": episode.actions, "next_observations": states[1:], "ends": ends}
        cell, moved = cell_of(domain, obs["desired_goal"][0]), moved + bool(np.ptp(obs["desired_goal"], 0).any())
        if cell in goals:
            split["directed"][tasks[goals.index(cell)]].append(part)
        else:
            elsewhere[str(cell)] = elsewhere.get(str(cell), 0) + 1
        split["undirected"][tasks[deal[i]]].append(part)
        read += len(ends)
        if i % 50 == 0 or read == dataset.total_steps:
            print(f"\r{domain}: {read}/{dataset.total_steps} transitions read, {time.time() - start:.0f} s", end="")
    print()
    print(f"{domain} directed: episodes commanded to no task's goal cell, left out: {elsewhere or 'none'}")
    if moved:
        print(f"note: {moved} episodes change their goal; each is filed under its first goal")
    return split, {"left_out_of_directed": elsewhere, "episodes_changing_goal": moved}


def convert_domain(args, domain):
    dataset_id, dataset = load_minari(args, domain)
    split, counts = split_episodes(args, domain, dataset)
    folder = os.path.join(args.out_dir, domain)
    os.makedirs(folder, exist_ok=True)
    prov = {"command": command(), "source": dataset_id, "environment": MAZES[domain][0], **counts, "files": {}}
    for mixture in args.mixtures:
        for k, task in enumerate(maze_tasks(domain)):
            if not split[mixture][task]:
                fail(f"{dataset_id} holds no episode commanded to {task}'s goal cell {MAZES[domain][2][k]}")
            data, name = as_dataset(domain, task, split[mixture][task]), f"{mixture}_{task}.npz"
            np.savez(os.path.join(folder, name), **data)
            entry = {"mixture": mixture, "task": task, "goal_cell": list(MAZES[domain][2][k]),
                     "transitions": len(data["terminals"]), **episode_stats(data)}  # fmt: skip
            prov["files"][name] = entry
            print(f"wrote {folder}/{name}: {entry['transitions']} transitions, {entry['episodes']} episodes, "
                  f"success {entry['success_rate']:.2f}")  # fmt: skip
    reference = {t: {"random_return": 0.0, "expert_return": 1.0} for t in maze_tasks(domain)}
    note = "D4RL's AntMaze normalisation: 0 and 1, so a normalised score is the success rate in %"
    json.dump({"note": note, "tasks": reference}, open(os.path.join(folder, "reference.json"), "w"), indent=2)
    json.dump(prov, open(os.path.join(folder, "provenance.json"), "w"), indent=2)


def write_reference(args, domain, d, folder, prov, prov_path):
    """reference.json: the reference success rates (rerun only when the settings change) and each file's data."""
    settings = {k: getattr(args, k) for k in ("seed", "kp", "kd", "noise", "reference_episodes")}
    path = os.path.join(folder, "reference.json")
    old = json.load(open(path)) if os.path.exists(path) else {}
    if old.get("settings") == settings and not args.overwrite:
        tasks = old["tasks"]
    else:
        start = time.time()
        tasks = reference(args, domain, d)
        print(f"{domain} reference: {time.time() - start:.0f} s")
    for task, info in tasks.items():
        info["datasets"] = {
            f["mixture"]: {k: f[k] for k in ("transitions", "episodes", "success_rate")}
            for f in prov["files"].values()
            if f["task"] == task
        }
    json.dump({"settings": settings, "tasks": tasks}, open(path, "w"), indent=2)
    prov["reference"] = {t: {k: v for k, v in info.items() if k != "datasets"} for t, info in tasks.items()}
    json.dump(prov, open(prov_path, "w"), indent=2)


def command():
    return " ".join(["python", "collect_maze.py", *sys.argv[1:]])


def readme_tables(out_dir, domains):
    """The rows of data/README.md's maze tables, from what is on disk."""
    for domain in domains:
        prov = json.load(open(os.path.join(out_dir, domain, "provenance.json")))
        for name, f in prov["files"].items():
            print(f"| {domain} | {f['mixture']} | {f['task']} | `{name}` | {f['transitions']} | {f['episodes']} | "
                  f"{100 * f['success_rate']:.1f} |")  # fmt: skip
    for domain in domains:
        ref = json.load(open(os.path.join(out_dir, domain, "reference.json")))["tasks"]
        for task, r in ref.items():
            rates = " | ".join(f"{100 * r[k]:.1f}" for k in ("random_return", "expert_return", "noisy_return"))
            print(f"| {domain} | {task} | ({r['goal_cell'][0]}, {r['goal_cell'][1]}) | {rates} |")


def main(args: Args):
    for name, interval in LIMITS.items():
        value, (low, high) = getattr(args, name), (float(x) for x in interval[1:-1].split(","))
        above_low = low <= value if interval[0] == "[" else low < value
        if not (above_low and (value <= high if interval[-1] == "]" else value < high)):
            fail(f"--{name.replace('_', '-')} must lie in {interval}, got {value}")  # NaN lies in no interval
    for flag, given, known in (("domains", args.domains, tuple(MAZES)), ("mixtures", args.mixtures, MIXTURES)):
        if not given or any(g not in known for g in given):
            fail(f"--{flag} must name some of {', '.join(known)}, got {' '.join(given) or 'none'}")
    start = time.time()
    for domain in args.domains:
        if domain in MINARI:
            convert_domain(args, domain)
        else:
            collect_domain(args, domain, list(MAZES).index(domain))
    readme_tables(args.out_dir, [domain for domain in args.domains if domain not in MINARI])
    print(f"done in {time.time() - start:.0f} s")


def fail(message, code=2):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


if __name__ == "__main__":
    main(tyro.cli(Args))
