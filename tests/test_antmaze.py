"""AntMaze from Minari, with no download: a small fake of D4RL/antmaze/medium-diverse-v1 written with Minari's own
writer (the same spaces and keys), converted by collect_maze.py, checked against the environment's compute_reward,
and trained on by every script; and the conversion's and the scripts' refusals."""

import json
import os
import warnings
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import PRESENT, load_module, run_script

MEDIUM_ID, LARGE_ID = "D4RL/antmaze/medium-diverse-v1", "D4RL/antmaze/large-diverse-v1"
STEPS = 40  # per fake episode (the real ones run 1,000)
TINY = ["--hidden-dim", "32", "--n-hidden", "2", "--batch-size", "16", "--eval-episodes", "1", "--device", "cpu"]
LENGTH = {"hcsac": ["--epochs", "4", "--steps-per-epoch", "5", "--eval-every-epochs", "4", "--relabel-every", "2",
                    "--checkpoint-every-epochs", "2"],
          "brac_mt_cds": ["--total-steps", "20", "--eval-freq", "20", "--checkpoint-freq", "10",
                          "--behavior-warmup-steps", "10", "--actor-warmup-steps", "5",
                          "--cds-candidates", "16"]}  # fmt: skip
DEFAULT_LENGTH = ["--total-steps", "20", "--eval-freq", "20", "--checkpoint-freq", "10", "--log-freq", "5"]


def fake_dataset(dataset_id, env_id, cells, seed):
    """Random-action episodes in the continuing environment the real data was recorded in (reset_target=False: one
    commanded goal per episode), one per (goal cell, start cell), written with Minari's create_dataset_from_buffers.
    Starts and goals lie within 0.2 of their cells' centres (the real data's: 1), so that a start in the goal cell
    is on the goal."""
    import gymnasium_robotics
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    gym.register_envs(gymnasium_robotics)
    with warnings.catch_warnings():  # v4 is not the newest version: it is the one D4RL's data was recorded in
        warnings.simplefilter("ignore")
        env = gym.make(env_id, continuing_task=True, reset_target=False, max_episode_steps=STEPS)
    env.unwrapped.position_noise_range = 0.05  # (the ant's v4 takes no such argument)
    rng, episodes = np.random.default_rng(seed), []
    for i, (goal_cell, reset_cell) in enumerate(cells):
        obs, _ = env.reset(
            seed=seed + i, options={"goal_cell": np.array(goal_cell), "reset_cell": np.array(reset_cell)}
        )
        steps, done = [(obs, None, 0.0, False, False, {"success": False})], False
        while not done:
            action = rng.uniform(-1, 1, 8).astype(np.float32)
            obs, reward, terminated, truncated, info = env.step(action)
            steps.append((obs, action, reward, terminated, truncated, info))
            done = terminated or truncated
        observations = {key: np.array([s[0][key] for s in steps]) for key in steps[0][0]}
        infos = {"success": np.array([bool(s[5]["success"]) for s in steps]), "goal": observations["desired_goal"],
                 "qpos": np.concatenate([observations["achieved_goal"], observations["observation"][:, :13]], 1),
                 "qvel": observations["observation"][:, 13:]}  # fmt: skip
        episodes.append(EpisodeBuffer(id=i, observations=observations, actions=np.array([s[1] for s in steps[1:]]),
                                      rewards=np.array([s[2] for s in steps[1:]]), infos=infos,
                                      terminations=np.array([s[3] for s in steps[1:]]),
                                      truncations=np.array([s[4] for s in steps[1:]])))  # fmt: skip
    minari.create_dataset_from_buffers(dataset_id, episodes, env=env, eval_env=env.spec,
                                       algorithm_name="random actions (a test's fake)",
                                       author="tests", author_email="tests@example.org", code_permalink="tests",
                                       description="a fake of D4RL's AntMaze data")  # fmt: skip
    return episodes


@pytest.fixture(scope="module")
def minari_home(tmp_path_factory):
    """MINARI_DATASETS_PATH holding fakes of both datasets: the medium one has two episodes toward each of its goal
    cells (one starting in the goal cell, so that some steps lie on the goal) and two toward the start cell."""
    home = tmp_path_factory.mktemp("minari")
    before = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(home)
    try:
        cells = [(goal, reset) for goal in ((2, 6), (5, 1), (6, 5)) for reset in (goal, (1, 1))]
        cells += [((1, 1), (6, 5)), ((1, 1), (2, 6))]
        episodes = fake_dataset(MEDIUM_ID, "AntMaze_Medium_Diverse_GR-v4", cells, seed=0)
        fake_dataset(LARGE_ID, "AntMaze_Large_Diverse_GR-v4", [((7, 9), (1, 1))], seed=50)
    finally:
        os.environ.pop("MINARI_DATASETS_PATH") if before is None else os.environ.update(MINARI_DATASETS_PATH=before)
    return home, episodes, [goal for goal, _ in cells]


@pytest.fixture(scope="module")
def converted(minari_home, tmp_path_factory):
    home, _, _ = minari_home
    out = tmp_path_factory.mktemp("converted")
    os.environ["MINARI_DATASETS_PATH"] = str(home)
    try:
        result = run_script("collect_maze", "--domains", "antmaze-medium", "--out-dir", str(out), cwd=out)
    finally:
        os.environ.pop("MINARI_DATASETS_PATH")
    assert result.returncode == 0, result.stderr
    return out / "antmaze-medium", result.stdout


def states(episode):
    obs = episode.observations
    return np.concatenate([obs["achieved_goal"], obs["observation"]], 1).astype(np.float32)


def test_directed_files_hold_the_episodes_commanded_to_their_goal_cell(minari_home, converted):
    _, episodes, goals = minari_home
    folder, stdout = converted
    for k, cell in enumerate(((2, 6), (5, 1), (6, 5))):
        with np.load(folder / f"directed_goal_{k}.npz") as npz:
            assert str(npz["domain"]) == "antmaze-medium" and str(npz["task"]) == f"goal_{k}"
            mine = [states(e) for e, goal in zip(episodes, goals) if goal == cell]
            assert len(mine) == 2
            np.testing.assert_array_equal(npz["observations"], np.concatenate([s[:-1] for s in mine]))
            np.testing.assert_array_equal(npz["next_observations"], np.concatenate([s[1:] for s in mine]))
            assert npz["observations"].shape[1] == 29 and npz["actions"].shape[1] == 8
            ends = np.zeros(2 * STEPS, bool)
            ends[[STEPS - 1, 2 * STEPS - 1]] = True
            np.testing.assert_array_equal(npz["timeouts"] | npz["terminals"] & ends, ends)
    assert "left out: {'(1, 1)': 2}" in stdout  # the two episodes commanded to the start cell belong to no task
    prov = json.load(open(folder / "provenance.json"))
    assert prov["source"] == MEDIUM_ID and prov["left_out_of_directed"] == {"(1, 1)": 2}


def test_undirected_files_deal_every_episode_out_once_and_evenly(minari_home, converted):
    _, episodes, _ = minari_home
    folder, _ = converted
    firsts = []
    for k in range(3):
        with np.load(folder / f"undirected_goal_{k}.npz") as npz:
            obs = npz["observations"]
            assert len(obs) % STEPS == 0 and len(obs) // STEPS in (2, 3)  # 8 episodes among 3 tasks: 3, 3, 2
            firsts += [tuple(obs[i]) for i in range(0, len(obs), STEPS)]
    assert sorted(firsts) == sorted(tuple(states(e)[0]) for e in episodes)


def test_rewards_are_the_environment_s_compute_reward_at_the_goal_cell_centre(converted):
    """Every file's rewards and terminals, and the scripts' relabelling to every task, equal compute_reward of the
    ant's (x, y) at s' against the task's goal (the cell's centre, as evaluation places it)."""
    folder, _ = converted
    m = load_module("cql_mt_noshare")
    domain = m.DOMAINS["antmaze-medium"]
    envs = [domain.make_env(task) for task in domain.tasks]
    positives = 0
    for mixture in ("directed", "undirected"):
        for k, task in enumerate(domain.tasks):
            _, data = m.load_dataset(str(folder / f"{mixture}_{task}.npz"), "antmaze-medium")
            rewards, terminals = domain.relabel(data, domain.tasks)
            for j, env in enumerate(envs):
                env.reset(seed=0)
                goal = env.unwrapped.goal
                np.testing.assert_array_equal(goal, m.goal_xy("antmaze-medium", domain.tasks[j]))
                expected = env.unwrapped.compute_reward(data["next_observations"][:, :2], goal, {})
                np.testing.assert_array_equal(rewards[:, j], expected)
                np.testing.assert_array_equal(terminals[:, j], expected == 1.0)
            np.testing.assert_array_equal(data["rewards"], rewards[:, k])
            np.testing.assert_array_equal(data["terminals"], terminals[:, k])
            positives += int(data["rewards"].sum())
    assert positives > 0  # some fake steps lie on a goal, so both branches are checked


@pytest.mark.parametrize("script", PRESENT)
def test_every_script_trains_and_evaluates_on_converted_antmaze_data(script, tmp_path, converted):
    folder, _ = converted
    files = [str(folder / f"directed_goal_{k}.npz") for k in range(3)]
    extra = ["--cql-n-actions", "2"] if script != "brac_mt_cds" else []
    extra += ["--cds-candidates", "16"] if script == "cql_mt_cds" else []
    flags = ["--domain", "antmaze-medium", "--datasets", *files, *TINY, *LENGTH.get(script, DEFAULT_LENGTH), *extra]
    out = run_script(script, *flags, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "runs" / f"{script}__antmaze-medium-custom__1"
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["finished"] and summary["steps_done"] == 20 and len(summary["evals"]) == 1
    for task in ("goal_0", "goal_1", "goal_2"):
        assert summary["final"][task]["return"] in (0.0, 1.0)  # one episode's success
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    torch.manual_seed(1)
    fresh = load_module(script).Actor(3, 32, 2, *(16,) if script == "hcsac" else (), obs_dim=29, act_dim=8)
    assert ckpt["actor"]["head.weight"].shape == fresh.head.weight.shape == (16, 32)
    assert not torch.equal(ckpt["actor"]["head.weight"], fresh.head.weight)  # the updates happened


def conversion_error(tmp_path, monkeypatch, home, *flags):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(home))
    out = run_script("collect_maze", "--out-dir", str(tmp_path / "data"), *flags, cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert not (tmp_path / "data").exists()
    return lines[0]


def test_a_missing_dataset_gives_the_download_command(tmp_path, monkeypatch):
    line = conversion_error(tmp_path, monkeypatch, tmp_path / "empty", "--domains", "antmaze-large")
    assert line == f"error: {LARGE_ID} is not downloaded; get it with: minari download {LARGE_ID}"


def test_a_dataset_of_the_other_maze_is_refused(tmp_path, monkeypatch, minari_home):
    line = conversion_error(tmp_path, monkeypatch, minari_home[0], "--domains", "antmaze-medium",
                            "--minari-dataset", LARGE_ID)  # fmt: skip
    assert line == (f"error: {LARGE_ID} was recorded in AntMaze_Large_Diverse_GR-v4, not AntMaze_Medium_Diverse_GR-v4:"
                    " it is not antmaze-medium's data")  # fmt: skip


def test_converted_files_are_refused_by_other_domains_and_missing_ones_name_the_command(
    tmp_path, monkeypatch, converted
):
    folder, _ = converted
    m = load_module("cql_mt_noshare")
    for domain in ("maze-medium", "antmaze-large"):
        with pytest.raises(m.DatasetError, match=f"holds antmaze-medium data, not {domain} data"):
            m.load_dataset(str(folder / "directed_goal_0.npz"), domain)
    files = [str(folder / f"directed_goal_{k}.npz") for k in range(3)]
    out = run_script("cql_mt_noshare", "--domain", "maze-medium", "--datasets", *files, cwd=tmp_path)
    assert out.returncode == 2 and "holds antmaze-medium data, not maze-medium data" in out.stderr
    monkeypatch.setattr(m, "HERE", str(tmp_path))  # a checkout with no converted data
    args = SimpleNamespace(domain="antmaze-large", tasks=m.DOMAINS["antmaze-large"].tasks, datasets=(),
                           mixture="directed")  # fmt: skip
    with pytest.raises(m.DatasetError) as err:
        m.load_mixture(args)
    assert str(err.value) == (f"{tmp_path}/data/antmaze-large/directed_goal_0.npz not found; antmaze-large's files "
                              "are made by: python collect_maze.py --domains antmaze-large")  # fmt: skip
