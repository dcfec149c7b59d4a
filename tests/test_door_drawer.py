"""The door-drawer domain (the CDS paper's manipulation tasks): the scene built from Meta-World's model files, the
relabelling against Meta-World's own success definitions read from the simulator, the scripted controllers, smoke runs
of every script, and bad input."""

import json
import os
import re

import numpy as np
import pytest
import torch

from conftest import PRESENT, load_module, run_script

collect = load_module("collect_door_drawer")
TINY = ["--hidden-dim", "32", "--n-hidden", "2", "--batch-size", "16", "--eval-episodes", "1", "--device", "cpu"]
LENGTH = {"hcsac": ["--epochs", "4", "--steps-per-epoch", "5", "--eval-every-epochs", "4", "--relabel-every", "2",
                    "--checkpoint-every-epochs", "2"],
          "brac_mt_cds": ["--total-steps", "20", "--eval-freq", "20", "--checkpoint-freq", "10",
                          "--behavior-warmup-steps", "10", "--actor-warmup-steps", "5",
                          "--cds-candidates", "16"]}  # fmt: skip
STEPS = ["--total-steps", "20", "--eval-freq", "20", "--checkpoint-freq", "10", "--log-freq", "5"]


def metaworld_success(env):
    """Meta-World 3.0.0's success of each task, read from the simulator the way its environments read it (the door
    handle geom; the drawer's get_body_com, which is the body's frame origin; targets relative to the object bodies)."""
    data, model = env.data, env.model
    door, drawer = model.body("door").pos, model.body("drawer").pos
    handle, drawer_link = data.geom("handle").xpos, data.body("drawer_link").xpos
    return {
        "door_open": abs(handle[0] - (door + [-0.3, -0.45, 0.0])[0]) <= 0.08,
        "door_close": np.linalg.norm(handle - (door + [0.2, -0.2, 0.0])) <= 0.08,
        "drawer_open": np.linalg.norm(drawer_link + [0.0, -0.16, 0.0] - (drawer + [0.0, -0.36, 0.09])) <= 0.03,
        "drawer_close": np.linalg.norm(drawer_link + [0.0, -0.16, 0.05] - (drawer + [0.0, -0.16, 0.09])) <= 0.055,
    }


def test_the_scene_builds_from_meta_world_s_files_with_both_objects():
    m = load_module("cql_mt_noshare")
    env = m.DOMAINS["door-drawer"].make_env("door_open")
    np.testing.assert_array_equal(env.model.body("door").pos, m.DOOR)  # the scene puts them where the rules expect
    np.testing.assert_array_equal(env.model.body("drawer").pos, m.DRAWER)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (12,) and env.model.nq == 11 and env.model.nmocap == 1
    np.testing.assert_allclose(obs[:3], env.data.mocap_pos[0], atol=0.02)  # the weld holds the hand on the mocap
    assert obs[10] == 0.0 and -0.15 <= obs[11] <= 0.0  # door open starts shut; the drawer anywhere
    starts = {"door_open": (0.1, 0.6, 0.2), "door_close": (-0.4, 0.6, 0.2), "drawer_open": (-0.3, 0.6, 0.2)}
    for task, start in starts.items():  # the hand reaches its start whatever state the other object is in
        env = m.DOMAINS["door-drawer"].make_env(task)
        for seed in range(6):
            obs, _ = env.reset(seed=seed)
            assert np.abs(obs[:3] - start).max() < 0.03, (task, seed, obs[:3])
    obs, _ = m.DOMAINS["door-drawer"].make_env("door_close").reset(seed=0)
    assert obs[10] == pytest.approx(-np.pi / 2)  # door close starts open


def test_data_readme_lists_every_door_drawer_file_as_it_is():
    text = open(os.path.join(os.path.dirname(collect.__file__), "data", "README.md")).read()
    folder = os.path.join(os.path.dirname(collect.__file__), "data", "door-drawer")
    rows = re.findall(r"^\| `(\w+)\.npz` \| (\w+) \| ([\w-]+) \| (\d+) \| (\d+) \| (\d+) \|", text, re.M)
    assert {r[0] for r in rows} == set(collect.FILES), rows
    for name, task, kind, transitions, episodes, success in rows:
        assert collect.FILES[name] == (task, kind.replace("-", "_"))
        with np.load(os.path.join(folder, name + ".npz")) as npz:
            assert str(npz["task"]) == task and len(npz["rewards"]) == int(transitions)
            starts = np.concatenate([[0], np.flatnonzero(npz["terminals"] | npz["timeouts"])[:-1] + 1])
            assert len(starts) == int(episodes) and round(100 * npz["terminals"].sum() / len(starts)) == int(success)
    total = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    assert total < 15e6  # the domain's data fits in 15 MB


def test_relabelling_is_meta_world_s_success_for_every_source_and_target():
    """Noisy controller rollouts of every task; at every step each of the four tasks' success, relabelled from s'
    alone, equals Meta-World's definition read from the simulator, and the environment's own reward is its column."""
    m = load_module("cql_mt_noshare")
    domain, rng, states = m.DOMAINS["door-drawer"], np.random.default_rng(0), set()
    positives = np.zeros(4, int)
    for k, source in enumerate(domain.tasks):
        env = domain.make_env(source)
        for seed in range(3):
            obs, _ = env.reset(seed=seed)
            done = False
            while not done:
                action = np.clip(collect.controller(source, obs) + 0.5 * rng.standard_normal(4), -1, 1)
                obs, reward, terminated, truncated, _ = env.step(action)
                rewards, terminals = domain.relabel({"next_observations": obs[None]}, domain.tasks)
                expected = metaworld_success(env)
                assert terminals[0].tolist() == [bool(expected[t]) for t in domain.tasks]
                np.testing.assert_array_equal(rewards, terminals.astype(np.float32))
                assert reward == rewards[0, k] and terminated == terminals[0, k]
                positives += terminals[0]
                states.add((obs[10] < -1.0, obs[11] < -0.1))  # (door open, drawer open)
                done = terminated or truncated
    assert (positives > 0).all(), positives  # every task's success is met somewhere
    assert states == {(False, False), (False, True), (True, False), (True, True)}  # one open, the other shut, ...


@pytest.mark.parametrize("task", ["door_open", "door_close", "drawer_open", "drawer_close"])
def test_each_controller_succeeds_as_documented(task):
    """data/door-drawer/reference.json: the noiseless controllers; the expert files use noise 0.1."""
    env, rng = collect.make_dd_env(task), np.random.default_rng(1)
    clean = [collect.episode(env, lambda o: collect.controller(task, o), seed=s)[1] for s in range(5)]
    noisy = [collect.episode(env, lambda o: collect.controller(task, o) + 0.1 * rng.standard_normal(4), seed=s)[1]
             for s in range(5, 10)]  # fmt: skip
    assert np.mean(clean) >= 0.8 and np.mean(noisy) >= 0.8, (clean, noisy)
    assert not collect.episode(env, lambda o: np.zeros(4), seed=0)[1] or task == "drawer_close"  # doing nothing fails


@pytest.fixture(scope="module")
def dd_files(tmp_path_factory):
    """A tiny collection: every file of both mixtures, a few episodes each."""
    out = tmp_path_factory.mktemp("dd")
    flags = ["--expert-episodes", "2", "--replay-episodes", "3", "--reference-episodes", "1", "--out-dir", str(out)]
    result = run_script("collect_door_drawer", *flags, cwd=out)
    assert result.returncode == 0, result.stderr
    return out / "door-drawer"


def test_the_tiny_collection_writes_loadable_files_with_their_own_task_s_labels(dd_files):
    m = load_module("cql_mt_noshare")
    domain = m.DOMAINS["door-drawer"]
    names = {name for mixture in domain.mixtures.values() for name in mixture}
    assert {p.stem for p in dd_files.glob("*.npz")} == names
    for name in names:
        task, data = m.load_dataset(str(dd_files / f"{name}.npz"), "door-drawer")
        assert name.startswith(task)
        rewards, terminals = domain.relabel(data, domain.tasks)
        np.testing.assert_array_equal(terminals[:, domain.tasks.index(task)], data["terminals"])
        np.testing.assert_array_equal(rewards[:, domain.tasks.index(task)], data["rewards"])
        ends = data["terminals"] | data["timeouts"]
        assert ends[-1] and not (data["terminals"] & data["timeouts"]).any()
    prov = json.load(open(dd_files / "provenance.json"))
    assert prov["files"]["door_close_expert"]["noise_std"] == [0.1, 0.1]
    assert prov["files"]["door_open_medium_replay"]["noise_std"] == [30.0, 0.3]
    assert set(json.load(open(dd_files / "reference.json"))["tasks"]) == set(domain.tasks)


@pytest.mark.parametrize("script", PRESENT)
def test_every_script_trains_and_evaluates_on_door_drawer(script, tmp_path, dd_files):
    files = [
        str(dd_files / f"{name}.npz") for name in load_module(script).DOMAINS["door-drawer"].mixtures["imbalanced"]
    ]
    extra = ["--cql-n-actions", "2"] if script != "brac_mt_cds" else []
    extra += ["--cds-candidates", "16"] if script == "cql_mt_cds" else []
    flags = ["--domain", "door-drawer", "--datasets", *files, *TINY, *LENGTH.get(script, STEPS), *extra]
    out = run_script(script, *flags, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "runs" / f"{script}__door-drawer-custom__1"
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["finished"] and summary["steps_done"] == 20 and len(summary["evals"]) == 1
    for task in ("door_open", "door_close", "drawer_open", "drawer_close"):
        assert summary["final"][task]["return"] in (0.0, 1.0)  # one episode's success
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    torch.manual_seed(1)
    fresh = load_module(script).Actor(4, 32, 2, *(16,) if script == "hcsac" else (), obs_dim=12, act_dim=4)
    assert ckpt["actor"]["head.weight"].shape == fresh.head.weight.shape == (8, 32)
    assert not torch.equal(ckpt["actor"]["head.weight"], fresh.head.weight)  # the updates happened


def test_bad_door_drawer_files_are_one_error_line(tmp_path, dd_files):
    m = load_module("cql_mt_noshare")
    with np.load(dd_files / "door_close_expert.npz") as npz:
        good = {k: npz[k] for k in npz.files}
    cases = [
        (str(dd_files / "door_close_expert.npz"), "mt-walker2d", "holds door-drawer data, not mt-walker2d data"),
        ({**good, "observations": good["observations"][:, :10]}, "door-drawer",
         "observations have shape"),
        ({k: v for k, v in good.items() if k != "terminals"}, "door-drawer", "missing keys terminals"),
        ({**good, "actions": 2 * good["actions"]}, "door-drawer", "actions outside [-1, 1]"),
    ]  # fmt: skip
    for k, (source, domain, message) in enumerate(cases):
        path = source if isinstance(source, str) else str(tmp_path / f"bad{k}.npz")
        if not isinstance(source, str):
            np.savez(path, **source)
        with pytest.raises(m.DatasetError) as err:
            m.load_dataset(path, domain)
        assert message in str(err.value) and "\n" not in str(err.value), (k, str(err.value))
        if k == 1:  # through a script too: one line, exit 2, no run folder
            files = [path, *(str(dd_files / f"{n}.npz") for n in m.DOMAINS["door-drawer"].mixtures["imbalanced"][1:])]
            out = run_script("cql_mt_cds", "--domain", "door-drawer", "--datasets", *files, cwd=tmp_path)
            lines = out.stderr.strip().splitlines()
            assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr
            assert not (tmp_path / "runs").exists()


def test_missing_meta_world_is_one_error_line_with_the_pip_command(tmp_path, monkeypatch, dd_files):
    shadow = tmp_path / "shadow" / "metaworld"  # a metaworld without its model files hides the installed one
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(shadow.parent))
    files = [str(dd_files / f"{n}.npz") for n in load_module("hcsac").DOMAINS["door-drawer"].mixtures["imbalanced"]]
    for script in ("cql_mt_noshare", "hcsac"):
        out = run_script(script, "--domain", "door-drawer", "--datasets", *files, cwd=tmp_path)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, out.stderr
        assert lines[0] == "error: door-drawer needs Meta-World's models: pip install metaworld==3.0.0"
        assert not (tmp_path / "runs").exists()
    out = run_script("collect_door_drawer", "--out-dir", str(tmp_path / "data"), cwd=tmp_path)
    assert out.returncode == 2 and "pip install metaworld==3.0.0" in out.stderr
