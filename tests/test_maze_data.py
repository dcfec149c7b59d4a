"""The maze domains: the scripted controller, exact relabelling against every goal's environment, the shipped
files, data/README.md's maze tables, and the collection script itself."""

import json
import os
import re
import shlex

import numpy as np
import pytest
import tyro

from conftest import ROOT, load_module, run_script

collect = load_module("collect_maze")
ARGS = collect.Args()  # the controller's default gains and noise, as the data used them
DOMAINS = tuple(d for d in collect.MAZES if d not in collect.MINARI)  # the point robot's, collected here
KEYS = {"domain", "task", "observations", "actions", "next_observations", "rewards", "terminals", "timeouts"}


def shipped(domain):
    folder = os.path.join(ROOT, "data", domain)
    return sorted(f for f in os.listdir(folder) if f.endswith(".npz")) if os.path.isdir(folder) else []


def load(path):
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def maze_readme():
    """data/README.md from its maze heading on."""
    text = open(os.path.join(ROOT, "data", "README.md")).read()
    assert "\n# PointMaze" in text, "data/README.md has no maze section"
    return text[text.index("\n# PointMaze") :]


# ---------------------------------------------------------------- the controller
@pytest.mark.parametrize("domain", DOMAINS)
def test_the_noiseless_controller_reaches_every_goal_from_the_start(domain):
    for task in collect.maze_tasks(domain):
        env = collect.make_maze_env(domain, task)
        controller = collect.MazeController(env.unwrapped.maze, ARGS.kp, ARGS.kd)
        cell = tuple(int(i) for i in env.goal_cell)
        rate, _, _ = collect.success_rate(
            env, lambda obs: controller(obs, cell, env.goal), episodes=3, rng=np.random.default_rng(0)
        )
        assert rate >= 0.9, f"{domain} {task}: {rate}"


def test_the_recorded_controller_success_rates():
    for domain in DOMAINS:
        path = os.path.join(ROOT, "data", domain, "reference.json")
        if os.path.exists(path):
            ref = json.load(open(path))
            assert {k: ref["settings"][k] for k in ("kp", "kd", "noise")} == {
                "kp": ARGS.kp,
                "kd": ARGS.kd,
                "noise": ARGS.noise,
            }
            assert all(info["expert_return"] >= 0.9 for info in ref["tasks"].values()), domain


# ---------------------------------------------------------------- relabelling is exact
@pytest.mark.parametrize("domain", DOMAINS)
def test_relabelled_rewards_and_terminals_equal_every_goal_environment(domain):
    """Each source task's environment is driven by the noisy controller on a tour of the goals, on through its own
    goal as the undirected data goes on (stepping on after `terminated`); every step is replayed from the same
    simulator state in every target task's environment, whose reward and termination must equal maze_rewards of the
    stored (float32) s'."""
    tasks = collect.maze_tasks(domain)
    targets = [collect.make_maze_env(domain, t) for t in tasks]
    for env in targets:
        env.reset(seed=0)
    hits = np.zeros(len(tasks), int)
    for k, source in enumerate(tasks):
        env, rng = collect.make_maze_env(domain, source), np.random.default_rng(k)
        controller = collect.MazeController(env.unwrapped.maze, ARGS.kp, ARGS.kd)
        tour = [(k + 1 + i) % len(tasks) for i in range(len(tasks))]  # source k heads for goal k + 1 first
        obs, _ = env.reset(seed=k)
        for _ in range(450):
            goal = tour[0]
            cell, point = collect.MAZES[domain][2][goal], collect.goal_xy(domain, tasks[goal])
            action = collect.noisy(controller(obs, cell, point), ARGS.noise, rng)
            data = env.unwrapped.point_env.data
            qpos, qvel = data.qpos.copy(), data.qvel.copy()
            obs, reward, terminated, truncated, _ = env.step(action)
            relabelled = collect.maze_rewards(domain, tasks, obs[None].astype(np.float32))[0]
            assert reward == relabelled[k] and terminated == relabelled[k]
            for j, target in enumerate(targets):
                target.unwrapped.point_env.set_state(qpos, qvel)
                next_obs, target_reward, target_terminated, _, _ = target.step(action)
                assert np.array_equal(next_obs, obs), "the same state and action give the same s'"
                assert target_reward == relabelled[j] and target_terminated == relabelled[j], (source, tasks[j])
                hits[j] += target_terminated
            if relabelled[goal]:
                tour = tour[1:] + tour[:1]
            if truncated:
                obs, _ = env.reset(seed=int(rng.integers(2**31)))
    assert (hits > 0).all(), f"every goal is reached in the tours (else the check is vacuous): {hits}"


def test_maze_rewards_by_hand():
    next_obs = np.array([[0.5, 3.0, 0, 0], [0.5 + 0.44, 3.0, 0, 0], [0.5, 3.0 - 0.46, 0, 0]], np.float32)
    assert collect.goal_xy("maze-large", "goal_0").tolist() == [0.5, 3.0]  # cell (1, 6) of the 9 x 12 map
    assert collect.maze_rewards("maze-large", ["goal_0", "goal_1"], next_obs).tolist() == [
        [True, False],
        [True, False],
        [False, False],
    ]


# ---------------------------------------------------------------- the shipped files
needs_data = pytest.mark.skipif(not any(shipped(d) for d in DOMAINS), reason="no shipped maze data")


@needs_data
@pytest.mark.parametrize("domain", DOMAINS)
def test_every_shipped_maze_file(domain):
    tasks = collect.maze_tasks(domain)
    assert shipped(domain) == sorted(f"{m}_{t}.npz" for m in collect.MIXTURES for t in tasks)
    for name in shipped(domain):
        data = load(os.path.join(ROOT, "data", domain, name))
        n = len(data["rewards"])
        assert set(data) == KEYS, name
        assert str(data["domain"]) == domain and name == f"{name.split('_')[0]}_{data['task']}.npz"
        for key, shape, dtype in (("observations", (n, 4), np.float32), ("actions", (n, 2), np.float32),
                                  ("next_observations", (n, 4), np.float32), ("rewards", (n,), np.float32),
                                  ("terminals", (n,), np.bool_), ("timeouts", (n,), np.bool_)):  # fmt: skip
            assert data[key].shape == shape and data[key].dtype == dtype, (name, key)
        assert all(np.isfinite(data[k]).all() for k in ("observations", "actions", "next_observations")), name
        assert np.abs(data["actions"]).max() <= 1.0, name
        own = collect.maze_rewards(domain, [str(data["task"])], data["next_observations"])[:, 0]
        assert np.array_equal(data["terminals"], own) and np.array_equal(data["rewards"], own.astype(np.float32))
        assert not (data["terminals"] & data["timeouts"]).any(), name
        ends = np.zeros(n, bool)
        ends[collect.episode_starts(data)[1:] - 1] = ends[-1] = True
        assert (data["terminals"] | data["timeouts"])[ends].all(), f"{name}: every episode ends in one or the other"
        assert not data["timeouts"][~ends].any(), f"{name}: a timeout ends its episode"
        if name.startswith("directed"):
            assert not data["terminals"][~ends].any(), f"{name}: directed episodes stop at the goal"


@needs_data
def test_the_shipped_maze_data_stays_under_25_mb():
    total = sum(
        os.path.getsize(os.path.join(ROOT, "data", d, f))
        for d in DOMAINS
        for f in os.listdir(os.path.join(ROOT, "data", d))
    )
    assert total < 25e6


@needs_data
def test_the_readme_tables_match_the_files():
    text = maze_readme()
    rows = re.findall(
        r"^\| (maze-\w+) \| (\w+) \| (goal_\d+) \| `(\w+\.npz)` \| (\d+) \| (\d+) \| ([\d.]+) \|$", text, re.M
    )
    assert {(d, name) for d, _, _, name, *_ in rows} == {(d, f) for d in DOMAINS for f in shipped(d)}
    for domain, mixture, task, name, transitions, episodes, success in rows:
        data = load(os.path.join(ROOT, "data", domain, name))
        stats = collect.episode_stats(data)
        assert name == f"{mixture}_{task}.npz" and str(data["task"]) == task
        assert int(transitions) == len(data["rewards"]) and int(episodes) == stats["episodes"], name
        assert float(success) == pytest.approx(100 * stats["success_rate"], abs=0.051), name
        prov = json.load(open(os.path.join(ROOT, "data", domain, "provenance.json")))["files"][name]
        assert prov["transitions"] == len(data["rewards"]) and prov["success_rate"] == stats["success_rate"]
    refs = re.findall(
        r"^\| (maze-\w+) \| (goal_\d+) \| \((\d+), (\d+)\) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", text, re.M
    )
    assert {(d, t) for d, t, *_ in refs} == {(d, t) for d in DOMAINS for t in collect.maze_tasks(d)}
    for domain, task, row, col, *rates in refs:
        info = json.load(open(os.path.join(ROOT, "data", domain, "reference.json")))["tasks"][task]
        assert (int(row), int(col)) == collect.MAZES[domain][2][int(task[5:])] == tuple(info["goal_cell"])
        for value, key in zip(rates, ("random_return", "expert_return", "noisy_return")):
            assert float(value) == pytest.approx(100 * info[key], abs=0.051), (domain, task, key)


def test_the_goal_reaches_probe_output_is_what_it_prints_for_the_shipped_data(tmp_path):
    """benchmark/diagnostics/maze/maze_goal_reaches.txt, which benchmark/README.md quotes, is the probe's output."""
    probe = os.path.join("benchmark", "diagnostics", "maze", "maze_goal_reaches")
    out = run_script(probe, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == open(os.path.join(ROOT, probe + ".txt")).read()
    # medium, directed: goal_0's file reaches goal_0 only
    assert "goal_0      40100      257 |   257     0     0 |  257    0    0" in out.stdout


def test_the_readme_command_parses():
    commands = re.findall(r"^(python collect_maze\.py.*)$", maze_readme(), re.M)
    assert commands, "data/README.md gives the command that made the maze data"
    for command in commands:
        tyro.cli(collect.Args, args=shlex.split(command.split(" #")[0])[2:])


# ---------------------------------------------------------------- the collection script
def test_a_tiny_collection_writes_loadable_files_and_a_rerun_keeps_them(tmp_path):
    flags = ["--domains", "maze-medium", "--medium-size", "50", "--reference-episodes", "2", "--out-dir", str(tmp_path)]
    first = run_script("collect_maze", *flags, cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr
    folder = tmp_path / "maze-medium"
    names = sorted(f.name for f in folder.glob("*.npz"))
    assert names == sorted(f"{m}_goal_{k}.npz" for m in collect.MIXTURES for k in range(3))
    for name in names:
        data = load(folder / name)
        assert set(data) == KEYS and len(data["rewards"]) >= 50
    assert set(json.load(open(folder / "reference.json"))["tasks"]) == {"goal_0", "goal_1", "goal_2"}
    assert json.load(open(folder / "provenance.json"))["files"].keys() == set(names)
    stamps = {name: os.stat(folder / name).st_mtime_ns for name in names}
    second = run_script("collect_maze", *flags, cwd=tmp_path, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "kept" in second.stdout and "wrote" not in second.stdout
    assert stamps == {name: os.stat(folder / name).st_mtime_ns for name in names}, "a rerun keeps what is there"


@pytest.mark.parametrize("flags", [["--medium-size", "0"], ["--kp", "0"], ["--domains", "maze-huge"]])
def test_bad_flags_get_one_error_line(tmp_path, flags):
    result = run_script("collect_maze", *flags, "--out-dir", str(tmp_path), cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    assert not os.listdir(tmp_path)


def test_the_routing_probe_marks_what_leads_to_the_goal():
    probe = load_module("cds_routing", os.path.join(ROOT, "benchmark", "diagnostics", "maze", "cds_routing.py"))
    reached = np.array([[0, 0], [1, 0], [0, 0], [0, 0], [0, 1], [0, 0]], bool)  # two episodes: rows 0-2 and 3-5
    leads = probe.leads_to_goal(reached, ends=[2, 5])
    assert leads[:, 0].tolist() == [True, True, False, False, False, False]  # goal 0 is reached at row 1 only
    assert leads[:, 1].tolist() == [False, False, False, True, True, False]  # not across the episodes' border


def test_the_routing_probe_reads_a_cds_run(tmp_path):
    """On maze-medium's directed data no other task's episode reaches goal i, so nothing routed can lead to it."""
    flags = ["--domain", "maze-medium", "--mixture", "directed", "--n-hidden", "1", "--hidden-dim", "32"]
    flags += ["--cql-n-actions", "2", "--total-steps", "5", "--eval-freq", "5", "--eval-episodes", "1"]
    assert run_script("cql_mt_cds", *flags, cwd=tmp_path).returncode == 0
    probe = os.path.join("benchmark", "diagnostics", "maze", "cds_routing")
    out = run_script(probe, str(tmp_path / "runs" / "cql_mt_cds__maze-medium-directed__1"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith("goal_")]
    assert len(rows) == 6  # every (target, source) pair of three tasks
    for row in rows:
        lead_all, lead_own = (float(x) for x in row[1].split())
        assert lead_all == 0.0 and lead_own == 100.0
        for cell in row[3:]:  # per rule: routed %, lead % of the routed
            routed, lead = cell.split()
            assert 0.0 <= float(routed) <= 100.0 and lead in ("0", "nan")
