"""The maze domain in every training script: the loader's refusals, smoke runs that reach the updates and an
evaluation, and an exact resume."""

import json
import os

import numpy as np
import pytest
import torch

from conftest import PRESENT, ROOT, load_module, run_script

MEDIUM = os.path.join(ROOT, "data", "maze-medium")
TINY = ["--hidden-dim", "32", "--n-hidden", "2", "--batch-size", "16", "--eval-episodes", "1", "--device", "cpu"]
LENGTH = {"hcsac": ["--epochs", "4", "--steps-per-epoch", "5", "--eval-every-epochs", "2", "--relabel-every", "2",
                    "--checkpoint-every-epochs", "2"],
          "brac_mt_cds": ["--total-steps", "20", "--eval-freq", "10", "--checkpoint-freq", "10",
                          "--behavior-warmup-steps", "10", "--actor-warmup-steps", "5",
                          "--cds-candidates", "16"]}  # fmt: skip
STEPS = ["--total-steps", "20", "--eval-freq", "10", "--checkpoint-freq", "10", "--log-freq", "5"]


def flags(script):
    extra = ["--cql-n-actions", "2"] if script != "brac_mt_cds" else []
    extra += ["--cds-candidates", "16"] if script == "cql_mt_cds" else []
    return [*TINY, *LENGTH.get(script, STEPS), *extra]


@pytest.mark.parametrize("script", PRESENT)
def test_every_script_trains_and_evaluates_on_the_maze(script, tmp_path):
    out = run_script(script, "--domain", "maze-medium", "--mixture", "directed", *flags(script), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "runs" / f"{script}__maze-medium-directed__1"
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["finished"] and summary["steps_done"] == 20 and len(summary["evals"]) == 2
    assert summary["args"]["tasks"] == ["goal_0", "goal_1", "goal_2"] and summary["args"]["domain"] == "maze-medium"
    for task in ("goal_0", "goal_1", "goal_2"):  # a success rate: each episode returns 1 (reached) or 0
        assert summary["final"][task]["return"] in (0.0, 1.0)
        assert np.isfinite(summary["final"][task]["normalized_score"])
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    m = load_module(script)
    torch.manual_seed(1)
    fresh = m.Actor(3, 32, 2, *(16,) if script == "hcsac" else (), obs_dim=4, act_dim=2)
    assert ckpt["actor"]["head.weight"].shape == fresh.head.weight.shape == (4, 32)  # 2 actions: mean and log-std
    assert not torch.equal(ckpt["actor"]["head.weight"], fresh.head.weight)  # the updates happened


@pytest.mark.parametrize("script", ["cql_mt_cds", "hcsac"])
def test_resume_on_the_maze_continues_exactly(script, tmp_path):
    common = ["--domain", "maze-medium", *TINY, "--cql-n-actions", "2"]
    if script == "hcsac":
        half, whole = ["--epochs", "2", "--steps-per-epoch", "5", "--relabel-every", "1"], ["--epochs", "4"]
        common += ["--eval-every-epochs", "100", "--checkpoint-every-epochs", "1"]
    else:
        half, whole = ["--total-steps", "10"], ["--total-steps", "20"]
        common += ["--eval-freq", "100", "--checkpoint-freq", "5", "--cds-candidates", "16"]
    straight = run_script(script, *common, *half, *whole, "--exp-name", "straight", cwd=tmp_path)
    first = run_script(script, *common, *half, "--exp-name", "split", cwd=tmp_path)
    rest = run_script(script, *common, *half, *whole, "--exp-name", "split", "--resume", cwd=tmp_path)
    for out in (straight, first, rest):
        assert out.returncode == 0, out.stderr
    a = torch.load(tmp_path / "runs/straight__maze-medium-undirected__1/checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "runs/split__maze-medium-undirected__1/checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 20
    for key in ("actor", "critic", "critic_target"):
        for name, value in a[key].items():
            assert torch.equal(b[key][name], value), (key, name)


def write(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_the_loader_refuses_wrong_domains_sizes_and_goals(tmp_path, small_datasets):
    m = load_module("cql_mt_noshare")
    with np.load(os.path.join(MEDIUM, "directed_goal_0.npz")) as npz:
        good = {k: npz[k] for k in npz.files}
    assert m.load_dataset(os.path.join(MEDIUM, "directed_goal_0.npz"), "maze-medium")[0] == "goal_0"
    cases = [
        (small_datasets[0], "maze-medium", "holds mt-walker2d data, not maze-medium data"),
        (os.path.join(MEDIUM, "directed_goal_0.npz"), "mt-walker2d", "holds maze-medium data, not mt-walker2d data"),
        (os.path.join(MEDIUM, "directed_goal_0.npz"), "maze-large", "holds maze-medium data, not maze-large data"),
        (write(tmp_path / "goal5.npz", **{**good, "task": np.array("goal_5")}), "maze-medium", "unknown task 'goal_5'"),
        (write(tmp_path / "obs.npz", **{**good, "observations": good["observations"][:, :3]}), "maze-medium",
         "observations have shape (40100, 3), but maze-medium's have 4 features"),
        (write(tmp_path / "act.npz", **{**good, "actions": good["actions"][:, :1]}), "maze-medium",
         "actions has shape (40100, 1), expected (40100, 2)"),
    ]  # fmt: skip
    for path, domain, message in cases:
        with pytest.raises(m.DatasetError) as err:
            m.load_dataset(path, domain)
        assert message in str(err.value) and "\n" not in str(err.value), (path, domain, str(err.value))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--domain", "maze-huge"], "unknown domain 'maze-huge'; choose from mt-walker2d, maze-medium, maze-large"),
        (["--domain", "maze-medium", "--tasks", "goal_0", "goal_3"], "unknown task 'goal_3' of maze-medium"),
        (["--domain", "maze-medium", "--mixture", "imbalanced"], "unknown mixture 'imbalanced' of maze-medium"),
        (["--domain", "maze-large", "--datasets", os.path.join(MEDIUM, "directed_goal_0.npz")],
         "--datasets needs one file per task (7), got 1"),
        (["--domain", "maze-large", "--datasets", os.path.join(MEDIUM, "directed_goal_0.npz"), "gone.npz"],
         "dataset file not found: gone.npz"),  # a missing file is named, even among too few
        (["--tasks", "goal_0"], "unknown task 'goal_0' of mt-walker2d"),
    ],
)  # fmt: skip
def test_bad_domain_input_is_one_error_line(flags, message, tmp_path):
    out = run_script("cql_mt_cds", *flags, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], out.stderr
    assert not (tmp_path / "runs").exists()


def test_maze_relabelling_in_the_scripts_is_the_data_s_own():
    """Every shipped maze file's stored rewards and terminals are column `task` of the scripts' relabelling."""
    m = load_module("cql_mt_noshare")
    for domain in ("maze-medium", "maze-large"):
        tasks = m.DOMAINS[domain].tasks
        for mixture, files in m.DOMAINS[domain].mixtures.items():
            for task, name in zip(tasks, files):
                _, data = m.load_dataset(os.path.join(ROOT, "data", domain, name + ".npz"), domain)
                rewards, terminals = m.DOMAINS[domain].relabel(data, tasks)
                column = tasks.index(task)
                np.testing.assert_array_equal(rewards[:, column], data["rewards"])
                np.testing.assert_array_equal(terminals[:, column], data["terminals"])
                assert set(np.unique(rewards)) <= {0.0, 1.0}, (mixture, task)
