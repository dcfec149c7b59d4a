"""The MT-Walker2d task suite, the dataset loader and the collection script."""

import json
import os

import numpy as np
import pytest

from conftest import load_module, run_script


@pytest.fixture(scope="module")
def m():
    return load_module("cql_mt_noshare")


def rollout_with_states(task, n_steps, seed, lift_every=0):
    """Random-action transitions of `task` with the simulator state before each step.

    lift_every: every so many steps, raise the torso by 1 m first, so that the data holds states
    above the running tasks' 2 m limit (terminal for running, healthy for jumping).
    """
    m = load_module("cql_mt_noshare")
    env = m.make_env(task)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    rows = []
    for t in range(n_steps):
        sim = env.unwrapped
        if lift_every and t % lift_every == lift_every - 1:
            qpos, qvel = sim.data.qpos.copy(), sim.data.qvel.copy()
            qpos[1] += 1.0
            sim.set_state(qpos, qvel)
        qpos, qvel = sim.data.qpos.copy(), sim.data.qvel.copy()
        action = rng.uniform(-1, 1, 6).astype(np.float32)
        next_obs, reward, terminated, truncated, info = env.step(action)
        rows.append(
            (qpos, qvel, action, next_obs.astype(np.float32), np.float32(info["x_velocity"]), reward, terminated)
        )
        if terminated or truncated:
            obs, _ = env.reset()
    return rows


@pytest.mark.parametrize("source", ["run_forward", "run_backward", "jump"])
def test_relabelled_reward_and_terminal_equal_the_target_environment(m, source):
    """For transitions collected in `source`, replay each from the same simulator state in every
    target task's environment: its reward and termination must equal the relabelled ones."""
    rows = rollout_with_states(source, 300, seed=7, lift_every=25)
    actions = np.stack([r[2] for r in rows])
    next_obs = np.stack([r[3] for r in rows])
    x_velocity = np.stack([r[4] for r in rows])
    terminal_seen = {t: 0 for t in m.WALKER_TASKS}
    for target in m.WALKER_TASKS:
        relabelled_r = m.task_rewards(target, actions, next_obs, x_velocity)
        relabelled_d = m.task_terminals(target, next_obs)
        env = m.make_env(target)
        env.reset(seed=0)
        for k, (qpos, qvel, action, *_rest) in enumerate(rows):
            env.unwrapped.set_state(qpos, qvel)
            _, reward, terminated, _, _ = env.step(action)
            assert relabelled_r[k] == pytest.approx(reward, abs=1e-4), (source, target, k)
            assert bool(relabelled_d[k]) == terminated, (source, target, k)
            terminal_seen[target] += terminated
        if target == source:  # the source environment's own rewards, as stored
            np.testing.assert_allclose(relabelled_r, [r[5] for r in rows], atol=1e-4)
    # the lifted states make the running tasks terminate where jump does not
    assert terminal_seen["run_forward"] > terminal_seen["jump"]


def test_relabel_gives_every_task_a_column(m, small_datasets):
    task, data = m.load_dataset(small_datasets[2])
    rewards, terminals = m.DOMAINS["mt-walker2d"].relabel(data, m.WALKER_TASKS)
    assert rewards.shape == terminals.shape == (len(data["rewards"]), 3)
    own = m.WALKER_TASKS.index(task)
    np.testing.assert_allclose(rewards[:, own], data["rewards"], atol=1e-4)
    np.testing.assert_array_equal(terminals[:, own], data["terminals"])


def test_make_env_rejects_unknown_task(m):
    with pytest.raises(ValueError, match="unknown task 'fly'"):
        m.make_env("fly")


# ---------------------------------------------------------------- the loader refuses bad files
def write(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.fixture
def good(small_datasets):
    with np.load(small_datasets[0]) as npz:
        return {k: npz[k] for k in npz.files}


def test_loader_accepts_a_good_file(m, small_datasets):
    task, data = m.load_dataset(small_datasets[0])
    assert task == "run_forward" and data["observations"].shape == (600, 17)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_file", "dataset file not found"),
        ("not_npz", "not a readable .npz file"),
        ("missing_key", "missing keys x_velocity"),
        ("wrong_shape", "actions has shape (600, 5), expected (600, 6)"),
        ("short_field", "rewards has shape (599,), expected (600,)"),
        ("nan", "observations contains NaN or inf"),
        ("inf", "x_velocity contains NaN or inf"),
        ("obs_size", "observations have shape (600, 11), but mt-walker2d's have 17 features"),
        ("obs_scalar", "observations have shape (), but mt-walker2d's have 17 features"),
        ("unknown_task", "unknown task 'fly'"),
        ("actions_range", "actions outside [-1, 1]"),
    ],
)
def test_loader_refuses_bad_files_with_one_line(m, good, tmp_path, case, message):
    bad = dict(good)
    if case == "missing_file":
        path = str(tmp_path / "nope.npz")
    elif case == "not_npz":
        path = str(tmp_path / "text.npz")
        open(path, "w").write("hello")
    else:
        if case == "missing_key":
            del bad["x_velocity"]
        elif case == "wrong_shape":
            bad["actions"] = bad["actions"][:, :5]
        elif case == "short_field":
            bad["rewards"] = bad["rewards"][:-1]
        elif case == "nan":
            bad["observations"] = bad["observations"].copy()
            bad["observations"][3, 2] = np.nan
        elif case == "inf":
            bad["x_velocity"] = bad["x_velocity"].copy()
            bad["x_velocity"][5] = np.inf
        elif case == "obs_size":
            bad["observations"] = bad["observations"][:, :11]
            bad["next_observations"] = bad["next_observations"][:, :11]
        elif case == "obs_scalar":
            bad["observations"] = np.array(1.0)
        elif case == "unknown_task":
            bad["task"] = np.array("fly")
        elif case == "actions_range":
            bad["actions"] = bad["actions"] * 3
        path = write(tmp_path / f"{case}.npz", **bad)
    with pytest.raises(m.DatasetError) as err:
        m.load_dataset(path)
    text = str(err.value)
    assert message in text and "\n" not in text


# ---------------------------------------------------------------- the collection script
def test_tiny_collection_writes_loadable_datasets_and_resumes(m, tmp_path):
    flags = [
        "--tasks",
        "run_forward",
        "jump",
        "--learning-starts",
        "300",
        "--eval-every",
        "200",
        "--eval-episodes",
        "1",
        "--checkpoint-every",
        "200",
        "--batch-size",
        "32",
        "--expert-size",
        "300",
        "--medium-size",
        "400",
        "--reference-episodes",
        "2",
        "--datasets",
        "run_forward/medium-replay",
        "jump/expert",
        "jump/medium",
    ]
    first = run_script("collect_datasets", "--phase", "train", "--total-steps", "400", *flags, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    # running again without --resume refuses to overwrite the runs
    again = run_script("collect_datasets", "--phase", "train", "--total-steps", "400", *flags, cwd=tmp_path)
    assert again.returncode != 0 and "--resume" in again.stderr
    resumed = run_script("collect_datasets", "--total-steps", "800", "--resume", *flags, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step 400" in resumed.stdout
    for name in ("run_forward_medium_replay", "jump_expert", "jump_medium"):
        task, data = m.load_dataset(str(tmp_path / "data" / f"{name}.npz"))
        assert task == name.split("_medium")[0].split("_expert")[0]
        ends = data["terminals"] | data["timeouts"]
        assert ends[-1], "a dataset ends on an episode boundary"
        assert not (data["terminals"] & data["timeouts"]).any()
    # the replay buffer kept its steps across the resume, up to the medium snapshot
    ref = json.load(open(tmp_path / "data" / "reference.json"))["tasks"]
    medium_step = ref["run_forward"]["medium_snapshot_step"]
    assert len(np.load(tmp_path / "data" / "run_forward_medium_replay.npz")["rewards"]) == medium_step
    assert os.path.exists(tmp_path / "data" / "policies" / "jump_expert_actor.pt")
    for task in ("run_forward", "jump"):
        assert ref[task]["sac_steps"] == 800
        assert np.isfinite(ref[task]["random_return"]) and np.isfinite(ref[task]["expert_return"])


def test_collection_rejects_unknown_task(tmp_path):
    out = run_script("collect_datasets", "--tasks", "fly", cwd=tmp_path)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("error: unknown task 'fly'")
