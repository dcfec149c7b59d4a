"""The dm-control walker domain (HCSAC's benchmark): relabelling equal to dm-control's own reward, smoke runs of every
script, and the loader's and the scripts' refusals."""

import json
import os
import re

import numpy as np
import pytest
import torch

from conftest import PRESENT, ROOT, load_module, run_script

TINY = ["--hidden-dim", "32", "--n-hidden", "2", "--batch-size", "16", "--eval-episodes", "1", "--device", "cpu"]
LENGTH = {"hcsac": ["--epochs", "4", "--steps-per-epoch", "5", "--eval-every-epochs", "4", "--relabel-every", "2",
                    "--checkpoint-every-epochs", "2"],
          "brac_mt_cds": ["--total-steps", "20", "--eval-freq", "20", "--checkpoint-freq", "10",
                          "--behavior-warmup-steps", "10", "--actor-warmup-steps", "5",
                          "--cds-candidates", "16"]}  # fmt: skip
STEPS = ["--total-steps", "20", "--eval-freq", "20", "--checkpoint-freq", "10", "--log-freq", "5"]


def lockstep_rollout(n_steps, seed):
    """walk and run stepped side by side from the same seed with the same actions (one body, so one trajectory),
    the torso's x-velocity kicked to a random value now and then so that both speed terms take every branch."""
    collect = load_module("collect_datasets")
    envs = [collect.make_dmc_collect_env(task) for task in ("walk", "run")]
    obs = [env.reset(seed=seed)[0] for env in envs]
    rng, rows = np.random.default_rng(seed), []
    for _ in range(n_steps):
        if rng.random() < 0.2:
            kick = rng.uniform(-3.0, 12.0)
            for env in envs:
                env.unwrapped.physics.named.data.qvel["rootx"] = kick
        action = rng.uniform(-1, 1, 6).astype(np.float32)
        steps = [env.step(action) for env in envs]
        np.testing.assert_array_equal(steps[0][0], steps[1][0])  # the same body, the same states
        (next_obs, walk_r, _, truncated, info), run_r = steps[0], steps[1][1]
        rows.append((obs[0], action, next_obs, info["horizontal_velocity"], walk_r, run_r))
        obs = [next_obs, next_obs]
        if truncated:
            obs = [env.reset(seed=seed + len(rows))[0] for env in envs]
    return {key: np.array([r[k] for r in rows], np.float32) for k, key in enumerate(
        ("observations", "actions", "next_observations", "horizontal_velocity", "walk", "run"))}  # fmt: skip


def test_relabelling_equals_dm_control_s_reward_both_ways():
    """Transitions labelled by walk relabel to run's reward and the other way round, to float32 precision, from the
    stored fields alone; the walker's height and uprightness are obs[0] and obs[1] of s'."""
    m = load_module("cql_mt_noshare")
    data = lockstep_rollout(1500, seed=3)
    rewards, terminals = m.DOMAINS["dmc-walker"].relabel(data, ("walk", "run"))
    assert rewards.dtype == np.float32 and not terminals.any()
    np.testing.assert_allclose(rewards[:, 0], data["walk"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rewards[:, 1], data["run"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m.DOMAINS["dmc-walker"].relabel(data, ("run", "walk"))[0][:, 0], data["run"], atol=1e-6)
    speed, height = data["horizontal_velocity"], data["next_observations"][:, 0]
    assert (speed < 0).any() and ((speed > 0.5) & (speed < 1)).any() and ((speed > 4) & (speed < 8)).any()
    assert (speed > 8).any() and (height < 1.2).any() and (height > 1.2).any()  # every branch of both terms
    assert 0.05 < data["run"].mean() < data["walk"].mean()


@pytest.fixture(scope="module")
def dmc_datasets(tmp_path_factory):
    """One small file per task: random actions in dm-control's walker, 300 steps each, in the shipped format."""
    collect, folder, paths = load_module("collect_datasets"), tmp_path_factory.mktemp("dmc"), []
    for k, task in enumerate(("walk", "run")):
        rng = np.random.default_rng(k)
        env, policy = collect.make_dmc_collect_env(task), lambda o: rng.uniform(-1, 1, 6).astype(np.float32)
        data, _ = collect.run_episodes(env, policy, n_steps=300, seed=k, fields=("horizontal_velocity",))
        paths.append(str(folder / f"{task}.npz"))
        np.savez_compressed(paths[-1], task=np.array(task), domain=np.array("dmc-walker"), **data)
    return paths


@pytest.mark.parametrize("script", PRESENT)
def test_every_script_trains_and_evaluates_on_dmc_walker(script, tmp_path, dmc_datasets):
    extra = ["--cql-n-actions", "2"] if script != "brac_mt_cds" else []
    extra += ["--cds-candidates", "16"] if script == "cql_mt_cds" else []
    flags = ["--domain", "dmc-walker", "--datasets", *dmc_datasets, *TINY, *LENGTH.get(script, STEPS), *extra]
    out = run_script(script, *flags, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "runs" / f"{script}__dmc-walker-custom__1"
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["finished"] and summary["steps_done"] == 20 and len(summary["evals"]) == 1
    assert summary["args"]["tasks"] == ["walk", "run"]
    for task in ("walk", "run"):  # a 1,000-step return of rewards in [0, 1]
        assert 0.0 < summary["final"][task]["return"] < 1000.0
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    m = load_module(script)
    torch.manual_seed(1)
    fresh = m.Actor(2, 32, 2, *(16,) if script == "hcsac" else (), obs_dim=24, act_dim=6)
    assert ckpt["actor"]["head.weight"].shape == fresh.head.weight.shape == (12, 32)
    assert not torch.equal(ckpt["actor"]["head.weight"], fresh.head.weight)  # the updates happened


def test_the_loader_refuses_dmc_files_elsewhere_and_broken_ones(tmp_path, dmc_datasets, small_datasets):
    m = load_module("cql_mt_noshare")
    with np.load(dmc_datasets[0]) as npz:
        good = {k: npz[k] for k in npz.files}
    assert m.load_dataset(dmc_datasets[0], "dmc-walker")[0] == "walk"
    cases = [
        (dmc_datasets[0], "mt-walker2d", "holds dmc-walker data, not mt-walker2d data"),
        (small_datasets[0], "dmc-walker", "holds mt-walker2d data, not dmc-walker data"),
        ({k: v for k, v in good.items() if k != "horizontal_velocity"}, "dmc-walker",
         "missing keys horizontal_velocity"),
        ({**good, "observations": good["observations"][:, :17]}, "dmc-walker",
         "observations have shape (300, 17), but dmc-walker's have 24 features"),
        ({**good, "horizontal_velocity": good["horizontal_velocity"][:5]}, "dmc-walker",
         "horizontal_velocity has shape (5,), expected (300,)"),
    ]  # fmt: skip
    for k, (source, domain, message) in enumerate(cases):
        path = source if isinstance(source, str) else str(tmp_path / f"bad{k}.npz")
        if not isinstance(source, str):
            np.savez(path, **source)
        with pytest.raises(m.DatasetError) as err:
            m.load_dataset(path, domain)
        assert message in str(err.value) and "\n" not in str(err.value), (k, str(err.value))


def test_missing_dm_control_is_one_error_line_with_the_pip_command(tmp_path, monkeypatch, dmc_datasets):
    blocked = tmp_path / "blocked" / "shimmy"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('no shimmy here')\n")
    monkeypatch.setenv("PYTHONPATH", str(blocked.parent))
    for script in ("cql_mt_noshare", "hcsac"):
        out = run_script(script, "--domain", "dmc-walker", "--datasets", *dmc_datasets, cwd=tmp_path)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, out.stderr
        assert lines[0] == "error: dmc-walker needs dm-control and Shimmy: pip install dm-control 'shimmy[dm-control]'"
        assert not (tmp_path / "runs").exists()


def test_tiny_dmc_collection_writes_files_the_scripts_load_and_relabel(tmp_path):
    """collect_datasets.py --domain dmc-walker: SAC, then medium and medium-replay files in data/dmc-walker/ whose
    stored rewards are the scripts' relabelling of their own task."""
    flags = ["--domain", "dmc-walker", "--total-steps", "400", "--learning-starts", "200", "--eval-every", "200",
             "--eval-episodes", "1", "--checkpoint-every", "200", "--batch-size", "32", "--expert-size", "300",
             "--medium-size", "300", "--reference-episodes", "1", "--medium-candidates", "1"]  # fmt: skip
    out = run_script("collect_datasets", *flags, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    m = load_module("cql_mt_noshare")
    folder = tmp_path / "data" / "dmc-walker"
    for task in ("walk", "run"):
        for kind in ("medium", "medium_replay"):
            source, data = m.load_dataset(str(folder / f"{task}_{kind}.npz"), "dmc-walker")
            rewards, _ = m.DOMAINS["dmc-walker"].relabel(data, ("walk", "run"))
            np.testing.assert_allclose(rewards[:, ("walk", "run").index(source)], data["rewards"], atol=1e-6)
            assert source == task and not data["terminals"].any() and data["timeouts"][-1]
        assert (folder / "policies" / f"{task}_expert_actor.pt").exists()
    reference = json.load(open(folder / "reference.json"))["tasks"]
    assert set(reference) == {"walk", "run"} and all(r["sac_steps"] == 400 for r in reference.values())


DMC_DATA = os.path.join(ROOT, "data", "dmc-walker")
shipped = pytest.mark.skipif(not os.path.exists(os.path.join(DMC_DATA, "reference.json")), reason="no dmc data")


@shipped
def test_the_shipped_dmc_files_load_relabel_and_match_data_readme():
    """Every file of both mixtures loads; its rewards are its task's relabelling; data/README.md gives its size,
    episodes and return (mean ± std), and the reference returns; the domain's data stays under 20 MB."""
    m, collect = load_module("cql_mt_noshare"), load_module("collect_datasets")
    domain, text = m.DOMAINS["dmc-walker"], open(os.path.join(ROOT, "data", "README.md")).read()
    rows = re.findall(r"^\| (\w+) \| ([\w-]+) \| `dmc-walker/(\w+\.npz)` \| (\d+) \| (\d+) \| ([\d.]+) ± ([\d.]+) \|$",
                      text, re.M)  # fmt: skip
    assert {row[2] for row in rows} == {f for f in os.listdir(DMC_DATA) if f.endswith(".npz")}
    assert {f"{name}.npz" for files in domain.mixtures.values() for name in files} <= {row[2] for row in rows}
    for task, kind, name, transitions, episodes, mean, std in rows:
        source, data = m.load_dataset(os.path.join(DMC_DATA, name), "dmc-walker")
        assert source == task and name == f"{task}_{kind.replace('-', '_')}.npz"
        rewards, _ = domain.relabel(data, domain.tasks)
        np.testing.assert_allclose(rewards[:, domain.tasks.index(task)], data["rewards"], atol=1e-6)
        returns = collect.episode_returns(data)
        assert len(data["rewards"]) == int(transitions) and len(returns) == int(episodes), name
        assert (float(mean), float(std)) == pytest.approx((returns.mean(), returns.std()), abs=0.051), name
    reference = json.load(open(os.path.join(DMC_DATA, "reference.json")))["tasks"]
    for task, info in reference.items():
        row = re.search(rf"^\| {task} \| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|", text, re.M)
        assert row and (int(row.group(1)), int(row.group(2))) == (info["sac_steps"], info["seed"]), task
        assert float(row.group(3)) == pytest.approx(info["random_return"], abs=0.051)
        assert float(row.group(4)) == pytest.approx(info["expert_return"], abs=0.051)
    files = [os.path.join(d, f) for d, _, names in os.walk(DMC_DATA) for f in names]
    assert sum(os.path.getsize(f) for f in files) < 20e6
