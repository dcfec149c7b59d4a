"""Make the door-drawer offline datasets: the CDS paper's manipulation tasks (Yu et al. 2021,
https://arxiv.org/abs/2109.08128) on Meta-World's Sawyer with a door and a drawer in one scene, from scripted
controllers with Gaussian action noise.

    python collect_door_drawer.py              # every file into data/door-drawer/, then reference.json
    python collect_door_drawer.py --overwrite  # redo the files that are already there

The controllers are Meta-World 3.0.0's scripted policies for these four tasks (door-open, door-close, drawer-open,
drawer-close), written out here for this scene's observation. The files (data/README.md, door-drawer):
  expert         the controller with noise of std --expert-noise on every action (then clipped to [-1, 1])
  medium-replay  what a learning agent's buffer holds: episode k's noise std falls log-linearly from the first of
                 --replay-noise to the second, so the early episodes fail more and the late ones succeed
Each file holds the tasks's own rewards and terminals (1 where its success holds at s'). reference.json holds the
success rates of uniformly random actions and of the noiseless controller (the 0 and 100 of a normalised score).
A file whose recorded settings match the flags is kept, so an interrupted collection continues where it stopped.
"""

import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import gymnasium as gym
import mujoco
import numpy as np
import tyro

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = {  # the files the mixtures use: (task, kind)
    "door_open_medium_replay": ("door_open", "medium_replay"),
    "door_close_medium_replay": ("door_close", "medium_replay"),
    "drawer_open_medium_replay": ("drawer_open", "medium_replay"),
    "drawer_close_medium_replay": ("drawer_close", "medium_replay"),
    "door_close_expert": ("door_close", "expert"),
    "drawer_open_expert": ("drawer_open", "expert"),
}


@dataclass
class Args:
    seed: int = 0  # every file draws from its own stream, np.random.default_rng((seed, file index))
    expert_episodes: int = 40  # episodes per expert file
    replay_episodes: int = 100  # episodes per medium-replay file
    expert_noise: float = 0.1  # std of the Gaussian noise on the expert's actions
    replay_noise: tuple[float, float] = (30.0, 0.3)  # medium-replay: the noise std of the first and the last episode
    reference_episodes: int = 20  # episodes per task for each reference success rate
    out_dir: str = "data"  # the files go to <out_dir>/door-drawer/
    overwrite: bool = False  # redo files whose recorded settings match the flags (otherwise they are kept)


# ---------------------------------------------------------------- the task suite
# (the same definitions are copied into every training script; the parity tests pin them)
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


# ---------------------------------------------------------------- the scripted controllers
def move(hand, to, gain):
    return np.clip(gain * (np.asarray(to) - hand), -1.0, 1.0)


def controller(task, obs):
    """Meta-World's scripted policy of the task (move the hand toward a waypoint, gripper effort fixed), on this
    observation: obs[:3] the hand, obs[4:7] the door handle, obs[7:10] the drawer handle."""
    hand, door, drawer = obs[:3], obs[4:7], obs[7:10]
    if task == "door_open":  # above the handle, down beside it, then pull it round
        handle = door - [0.05, 0.0, 0.0]
        if np.linalg.norm(hand[:2] - handle[:2]) > 0.12:
            return np.append(move(hand, handle + [0.06, 0.02, 0.2], 25.0), 1.0)
        if abs(hand[2] - handle[2]) > 0.04:
            return np.append(move(hand, handle + [0.06, 0.02, 0.0], 25.0), 1.0)
        return np.append(move(hand, handle, 25.0), 1.0)
    if task == "door_close":  # behind the open door's edge, then push it to the closed door's handle position
        edge = door + [0.05, 0.12, 0.1]
        if hand[0] > edge[0]:
            to = [hand[0], hand[1], edge[2] + 0.25] if hand[2] < edge[2] + 0.2 else [edge[0] - 0.02, edge[1], hand[2]]
        elif abs(hand[2] - edge[2]) > 0.04:
            to = edge + [-0.02, 0.0, 0.0]
        else:
            to = DOOR + [0.2, -0.2, 0.0]
        return np.append(move(hand, to, 25.0), 1.0)
    if task == "drawer_open":  # above the handle, down to it, then pull (gripper open)
        handle = drawer + [0.0, 0.0, -0.02]
        if np.linalg.norm(hand[:2] - handle[:2]) > 0.06:
            return np.append(move(hand, handle + [0.0, 0.0, 0.3], 4.0), -1.0)
        if abs(hand[2] - handle[2]) > 0.04:
            return np.append(move(hand, handle, 4.0), -1.0)
        return np.append(move(hand, handle + [0.0, -0.06, 0.0], 50.0), -1.0)
    front = drawer + [0.0, 0.0, 0.03]  # drawer_close: Meta-World's handle is 5 cm higher; from in front, push it in
    if hand[1] > front[1]:
        to = [hand[0], hand[1], front[2] + 0.5] if hand[2] < front[2] + 0.23 else front + [0.0, -0.075, 0.23]
    elif abs(hand[2] - front[2]) > 0.04:
        to = front + [0.0, -0.075, 0.0]
    else:
        to = front
    return np.append(move(hand, to, 25.0), 1.0)


def episode(env, policy, seed):
    """One episode: its transitions (the file's keys) and whether it succeeded."""
    obs, _ = env.reset(seed=seed)
    rows, done = {k: [] for k in ("observations", "actions", "next_observations", "terminals", "timeouts")}, False
    while not done:
        action = np.clip(policy(obs), -1.0, 1.0).astype(np.float32)
        next_obs, _, terminated, truncated, _ = env.step(action)
        for key, value in zip(rows, (obs, action, next_obs, terminated, truncated and not terminated)):
            rows[key].append(value)
        obs, done = next_obs, terminated or truncated
    return rows, terminated


def collect_file(args, name, index):
    """One file's episodes: the controller with a fixed (expert) or a falling (medium-replay) noise std."""
    task, kind = FILES[name]
    env, rng = make_dd_env(task), np.random.default_rng((args.seed, index))
    n = args.expert_episodes if kind == "expert" else args.replay_episodes
    first, last = (args.expert_noise, args.expert_noise) if kind == "expert" else args.replay_noise
    stds = np.geomspace(first, last, n)
    data, successes, start = {}, [], time.time()
    for k, std in enumerate(stds):
        rows, success = episode(
            env, lambda o: controller(task, o) + std * rng.standard_normal(4), seed=int(rng.integers(2**31))
        )
        for key, value in rows.items():
            data.setdefault(key, []).extend(value)
        successes.append(success)
        print(
            f"\r{name}: episode {k + 1}/{n}, success so far {np.mean(successes):.2f}, {time.time() - start:.0f} s",
            end="",
        )
    print()
    data = {k: np.array(v, np.float32 if k not in ("terminals", "timeouts") else bool) for k, v in data.items()}
    data["rewards"] = data["terminals"].astype(np.float32)
    stats = {"task": task, "kind": kind, "episodes": n, "transitions": len(data["rewards"]),
             "success_rate": float(np.mean(successes)), "noise_std": [float(first), float(last)],
             "success_by_third": [float(np.mean(t)) for t in np.array_split(successes, 3)]}  # fmt: skip
    return {"domain": np.array("door-drawer"), "task": np.array(task), **data}, stats


def success_rate(env, policy, episodes, rng):
    return float(np.mean([episode(env, policy, seed=int(rng.integers(2**31)))[1] for _ in range(episodes)]))


def reference(args):
    """Per task: success of uniformly random actions (a normalised score of 0) and of the noiseless controller (100)."""
    out = {}
    for k, task in enumerate(DD_TASKS):
        env, rng = make_dd_env(task), np.random.default_rng((args.seed, len(FILES) + k))
        random_rate = success_rate(env, lambda o: rng.uniform(-1, 1, 4), args.reference_episodes, rng)
        expert_rate = success_rate(env, lambda o: controller(task, o), args.reference_episodes, rng)
        out[task] = {"random_return": random_rate, "expert_return": expert_rate, "episodes": args.reference_episodes}
        print(f"{task}: success random {random_rate:.2f}, controller {expert_rate:.2f}")
    return out


def command():
    return " ".join(["python", "collect_door_drawer.py", *sys.argv[1:]])


def main(args: Args):
    if min(args.expert_episodes, args.replay_episodes, args.reference_episodes) < 1:
        fail("--expert-episodes, --replay-episodes and --reference-episodes must be at least 1")
    if not all(np.isfinite(x) and x >= 0 for x in (args.expert_noise, *args.replay_noise)):
        fail("the noise stds must be finite and at least 0")
    try:
        make_dd_env(DD_TASKS[0])
    except ImportError as e:
        fail(str(e))
    folder = os.path.join(args.out_dir, "door-drawer")
    os.makedirs(folder, exist_ok=True)
    prov_path = os.path.join(folder, "provenance.json")
    prov = json.load(open(prov_path)) if os.path.exists(prov_path) else {"files": {}}
    settings = {k: v for k, v in asdict(args).items() if k not in ("out_dir", "overwrite", "reference_episodes")}
    for index, name in enumerate(FILES):
        path = os.path.join(folder, name + ".npz")
        if os.path.exists(path) and prov["files"].get(name, {}).get("settings") == settings and not args.overwrite:
            print(f"{name}: kept (the recorded settings match; --overwrite redoes it)")
            continue
        data, stats = collect_file(args, name, index)
        np.savez_compressed(path, **data)
        prov["files"][name] = {**stats, "settings": settings, "command": command(), "bytes": os.path.getsize(path)}
        json.dump(prov, open(prov_path, "w"), indent=2)
        print(f"wrote {path}: {stats['transitions']} transitions, success {stats['success_rate']:.2f}")
    ref_path = os.path.join(folder, "reference.json")
    old = json.load(open(ref_path)) if os.path.exists(ref_path) else {}
    ref_settings = {"seed": args.seed, "reference_episodes": args.reference_episodes}
    if old.get("settings") != ref_settings or args.overwrite:
        json.dump({"settings": ref_settings, "tasks": reference(args)}, open(ref_path, "w"), indent=2)
    for name, f in prov["files"].items():
        print(f"| `{name}.npz` | {f['transitions']} | {f['episodes']} | {100 * f['success_rate']:.0f} | "
              f"{f['noise_std'][0]:g} → {f['noise_std'][1]:g} | {f['bytes'] / 1e6:.2f} MB |")  # fmt: skip


def fail(message, code=2):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


if __name__ == "__main__":
    main(tyro.cli(Args))
