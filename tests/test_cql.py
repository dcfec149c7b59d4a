"""The CQL family: sharing rules, smoke runs that reach the updates, resume, divergence, bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, load_module, run_script

CQL_SCRIPTS = ["cql_mt_noshare", "cql_mt_shareall", "cql_mt_cds"]
TINY = [
    "--hidden-dim",
    "32",
    "--n-hidden",
    "2",
    "--batch-size",
    "16",
    "--cql-n-actions",
    "2",
    "--eval-episodes",
    "1",
    "--log-freq",
    "5",
]


def scalars(run_dir, tag):
    acc = EventAccumulator(run_dir)
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


# ---------------------------------------------------------------- sharing rules on hand-built values
def test_cds_route_threshold_percentile_and_basic():
    """The threshold is the p-th percentile of the own batch's Q-hat: p = 10 routes what reaches the value 90% of the
    own batch exceeds, p = 90 only what reaches its top tenth; basic: the mean."""
    m = load_module("cql_mt_cds")
    q_own = torch.stack([torch.arange(100.0), torch.arange(100.0) * 2])  # task 0: 0..99, task 1: 0..198
    q_candidates = torch.tensor([[89.2, 89.0, 49.5, 9.95, 9.8], [178.3, 178.0, 99.0, 19.85, 19.7]])
    # p = 10: the 0.1 quantile (9.9 and 19.8)
    assert m.cds_route(q_own, q_candidates, percentile=10.0).tolist() == [[True, True, True, True, False]] * 2
    # p = 50: the median (49.5 and 99.0); a candidate at the threshold is routed (Delta >= 0)
    assert m.cds_route(q_own, q_candidates, percentile=50.0).tolist() == [[True, True, True, False, False]] * 2
    # p = 90: the 0.9 quantile (89.1 and 178.2)
    assert m.cds_route(q_own, q_candidates, percentile=90.0).tolist() == [[True, False, False, False, False]] * 2
    # basic: threshold at the mean Q-hat of the own batch (49.5 and 99.0), whatever p
    basic = m.cds_route(q_own, torch.tensor([[49.5, 49.4, 0, 0], [99.0, 98.9, 0, 500]]), percentile=90.0, basic=True)
    assert basic.tolist() == [[True, False, False, False], [True, False, False, True]]
    assert m.Args().cds_threshold_percentile is None and m.Args().cds_percentile is None  # None: the domain's


@pytest.mark.parametrize("script", ["cql_mt_cds", "brac_mt_cds"])
def test_the_threshold_defaults_to_the_domains_and_is_printed(script, capsys):
    """Without the flag a run takes its domain's p from the record (MT-Walker2d 10, the mazes 90); the flag, or the
    old one, overrides it; the rule is printed before the run starts."""
    m = load_module(script)
    q_own, q_candidates = torch.arange(100.0)[None], torch.tensor([[89.2, 89.0, 49.5, 9.95, 9.8]])
    expected = {"mt-walker2d": 10.0, "maze-medium": 90.0, "maze-large": 90.0, "antmaze-medium": 90.0}
    for domain, p in expected.items():
        args = m.Args(domain=domain)
        m.threshold_rule(args)
        assert args.cds_threshold_percentile == p == m.DOMAINS[domain].cds_threshold_percentile
        assert (
            f"CDS threshold: the {p:g}th percentile of each own batch's Q-hat ({domain}'s default)"
            in capsys.readouterr().out
        )
    routed = m.cds_route(q_own, q_candidates, m.DOMAINS["maze-medium"].cds_threshold_percentile)
    assert routed.tolist() == [[True, False, False, False, False]]  # the mazes' p = 90: only the own top tenth's
    routed = m.cds_route(q_own, q_candidates, m.DOMAINS["mt-walker2d"].cds_threshold_percentile)
    assert routed.tolist() == [[True, True, True, True, False]]  # the walker's p = 10
    for flags, p in (({"cds_threshold_percentile": 50.0}, 50.0), ({"cds_percentile": 70.0}, 30.0)):
        args = m.Args(domain="maze-medium", **flags)
        m.threshold_rule(args)
        assert args.cds_threshold_percentile == p and "default" not in capsys.readouterr().out
    args = m.Args(domain="maze-medium", cds_basic=True)
    m.threshold_rule(args)
    assert "CDS threshold: the mean of each own batch's Q-hat" in capsys.readouterr().out


def fake_buffer(sizes):
    n = sum(sizes)
    source = np.concatenate([np.full(s, i) for i, s in enumerate(sizes)])
    return {
        "obs": torch.arange(n, dtype=torch.float32)[:, None].expand(n, 17).clone(),
        "next_obs": torch.zeros(n, 17),
        "actions": torch.zeros(n, 6),
        "rewards_all": torch.arange(n * 3, dtype=torch.float32).reshape(n, 3),
        "terminals_all": torch.zeros(n, 3),
        "source": torch.tensor(source),
    }


def test_sample_others_never_draws_the_own_task_and_covers_the_rest():
    m = load_module("cql_mt_cds")
    sizes = torch.tensor([50, 30, 20])
    starts = torch.cumsum(sizes, 0) - sizes
    torch.manual_seed(0)
    idx = m.sample_others(starts, sizes, 20_000)
    source = fake_buffer([50, 30, 20])["source"]
    for i in range(3):
        drawn = source[idx[i]]
        assert (drawn != i).all()
        assert set(idx[i].tolist()) == set(np.flatnonzero(source.numpy() != i).tolist())  # every other index
    # uniform over the union without D_0: 30 of 50 from task 1
    assert (source[idx[0]] == 1).float().mean().item() == pytest.approx(0.6, abs=0.02)


def test_noshare_and_shareall_sampling():
    sizes = torch.tensor([50, 30, 20])
    starts = torch.cumsum(sizes, 0) - sizes
    buf = fake_buffer([50, 30, 20])
    args = load_module("cql_mt_noshare").Args(batch_size=5000, tasks=("run_forward", "run_backward", "jump"))
    torch.manual_seed(0)
    batch, stats = load_module("cql_mt_noshare").sample_batch(buf, starts, sizes, None, args)
    assert stats == {}
    for i in range(3):  # own data only, rewards relabelled to task i (column i)
        rows = batch["obs"][i, :, 0].long()
        assert (buf["source"][rows] == i).all()
        torch.testing.assert_close(batch["rewards"][i], (rows * 3 + i).float())
    batch, stats = load_module("cql_mt_shareall").sample_batch(buf, starts, sizes, None, args)
    for i in range(3):
        rows = batch["obs"][i, :, 0].long()
        torch.testing.assert_close(batch["rewards"][i], (rows * 3 + i).float())
        assert set(buf["source"][rows].tolist()) == {0, 1, 2}
    # the share of dst's batch drawn from src: about src's share of the union
    assert stats["batch/jump/from_run_forward"].item() == pytest.approx(0.5, abs=0.03)
    assert stats["batch/run_forward/from_jump"].item() == pytest.approx(0.2, abs=0.03)
    for dst in ("run_forward", "run_backward", "jump"):  # with the own share, the sources add up to the batch
        others = sum(v.item() for k, v in stats.items() if k.startswith(f"batch/{dst}/"))
        own = (buf["source"][batch["obs"][("run_forward", "run_backward", "jump").index(dst), :, 0].long()] ==
               ("run_forward", "run_backward", "jump").index(dst)).float().mean().item()  # fmt: skip
        assert others + own == pytest.approx(1.0)


def test_cds_batch_routes_by_the_min_of_the_twin_critics():
    m = load_module("cql_mt_cds")
    sizes = torch.tensor([50, 30, 20])
    starts = torch.cumsum(sizes, 0) - sizes
    buf = fake_buffer([50, 30, 20])

    def critic(obs, task_ids, actions):
        """Q1 = buffer index, Q2 = index + 1000 for task 0 only: the min is the index."""
        index = obs[..., 0]
        return torch.stack([index, index + 1000 * (task_ids == 0)])

    assert m.conservative_q(critic, buf, torch.tensor([[3, 70]])).tolist() == [[3.0, 70.0]]
    args = m.Args(
        batch_size=2000,
        cds_candidates=2000,
        cds_threshold_percentile=50.0,
        tasks=("run_forward", "run_backward", "jump"),
    )
    torch.manual_seed(0)
    batch, stats = m.sample_batch(buf, starts, sizes, critic, args)
    weights, rows = batch["weights"], batch["obs"][..., 0].long()
    assert (weights[:, :2000] == 1).all()  # the own batch is always trained on
    # task 0 (indices 0..49, median ~24.5): every candidate of tasks 1 and 2 (indices >= 50) is routed
    assert (weights[0, 2000:] == 1).all()
    # task 2 (indices 80..99, median ~89.5): no candidate of task 0 or 1 (indices < 80) reaches it
    assert (weights[2, 2000:] == 0).all()
    # task 1 (indices 50..79, median ~64.5): candidates of task 2 routed, of task 0 not
    cand = rows[1, 2000:]
    assert ((weights[1, 2000:] == 1) == (cand >= 80)).all()
    assert stats["cds/jump_to_run_backward/routed_fraction"].item() == 1.0
    assert stats["cds/run_forward_to_run_backward/routed_fraction"].item() == 0.0
    # the share of task 0's batch from task 2, by training weight: its routed candidates over own + routed
    from_jump = ((buf["source"][rows[0]] == 2).float() * weights[0]).sum() / weights[0].sum()
    assert stats["batch/run_forward/from_jump"].item() == pytest.approx(from_jump.item())
    assert stats["batch/jump/from_run_forward"].item() == 0.0  # nothing routed to jump
    assert stats["cds/run_forward/routed_fraction"].item() == 1.0
    # Q-hat of the routed data: the mean over what was routed, undefined (NaN) where nothing was
    assert stats["cds/run_forward/q_routed"].item() == pytest.approx(rows[0, 2000:].double().mean().item())
    assert math.isnan(stats["cds/jump/q_routed"].item())
    # relabelled rewards of routed candidates: column of the target task
    torch.testing.assert_close(batch["rewards"][1], (rows[1] * 3 + 1).float())


# ---------------------------------------------------------------- smoke runs
@pytest.mark.parametrize("script", CQL_SCRIPTS)
def test_smoke_run_reaches_the_updates(script, small_datasets, tmp_path):
    out = run_script(
        script,
        "--datasets",
        *small_datasets,
        "--total-steps",
        "30",
        "--eval-freq",
        "30",
        "--checkpoint-freq",
        "15",
        *TINY,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "runs" / f"{script}__custom__1"
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["finished"] and summary["steps_done"] == 30
    assert set(summary["final"]) >= {"run_forward", "run_backward", "jump", "average_return"}
    for key in (
        "losses/critic_loss",
        "losses/actor_loss",
        "losses/cql_gap",
        "charts/SPS",
        "eval/jump/return",
        "eval/average_normalized_score",
    ):
        assert scalars(str(run_dir), key), key
    assert [s for s, _ in scalars(str(run_dir), "losses/critic_loss")] == [5, 10, 15, 20, 25, 30]
    if script != "cql_mt_noshare":
        assert scalars(str(run_dir), "batch/jump/from_run_forward")
    if script == "cql_mt_cds":
        assert scalars(str(run_dir), "cds/run_forward_to_jump/routed_fraction")
    # the networks moved away from their initialisation
    m = load_module(script)
    torch.manual_seed(1)
    fresh = m.Actor(3, 32, 2)
    trained = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert trained["step"] == 30
    changed = [not torch.equal(fresh.state_dict()[k], v) for k, v in trained["actor"].items()]
    assert all(changed)


@pytest.mark.parametrize("flag", ["--bf16", "--compile"])
def test_fast_paths_reach_the_updates(flag, small_datasets, tmp_path):
    out = run_script(
        "cql_mt_cds",
        "--datasets",
        *small_datasets,
        "--total-steps",
        "10",
        "--eval-freq",
        "10",
        flag,
        *TINY,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "runs" / "cql_mt_cds__custom__1"
    assert json.load(open(run_dir / "summary.json"))["steps_done"] == 10
    losses = [v for _, v in scalars(str(run_dir), "losses/critic_loss")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("script", ["cql_mt_noshare", "cql_mt_cds"])
def test_resume_continues_the_run_exactly(script, small_datasets, tmp_path):
    flags = ["--datasets", *small_datasets, "--eval-freq", "20", "--checkpoint-freq", "10", *TINY]
    straight = run_script(script, *flags, "--total-steps", "20", "--exp-name", "straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    half = run_script(script, *flags, "--total-steps", "10", "--exp-name", "split", cwd=tmp_path)
    assert half.returncode == 0, half.stderr
    rest = run_script(script, *flags, "--total-steps", "20", "--exp-name", "split", "--resume", cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr
    assert "resumed" in rest.stdout
    a = torch.load(tmp_path / "runs/straight__custom__1/checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "runs/split__custom__1/checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 20
    for key in ("actor", "critic", "critic_target"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=0, atol=0)


def test_same_seed_gives_the_same_first_losses(small_datasets, tmp_path):
    for name in ("a", "b"):
        out = run_script(
            "cql_mt_cds",
            "--datasets",
            *small_datasets,
            "--total-steps",
            "5",
            "--log-freq",
            "1",
            "--eval-freq",
            "1000",
            "--exp-name",
            name,
            *TINY[:-2],
            cwd=tmp_path,
        )
        assert out.returncode == 0, out.stderr
    a = scalars(str(tmp_path / "runs/a__custom__1"), "losses/critic_loss")
    b = scalars(str(tmp_path / "runs/b__custom__1"), "losses/critic_loss")
    assert len(a) == 5 and a == b


@pytest.mark.parametrize("script", [*CQL_SCRIPTS, "hcsac"])
def test_progress_comes_in_seconds_whatever_the_log_freq(script, small_datasets, tmp_path):
    """The first progress line follows wall time, not --log-freq: here no step would ever reach the log frequency."""
    length = ["--total-steps", "1000000", "--eval-freq", "1000000"]
    if script == "hcsac":
        length = ["--epochs", "100000", "--steps-per-epoch", "10", "--eval-every-epochs", "100000"]
    tiny = TINY[:-2] if script != "hcsac" else ["--hidden-dim", "32", "--n-hidden", "2", "--batch-size", "16"]
    start = time.time()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script + ".py"), "--datasets", *small_datasets, *length,
                             *tiny, "--log-freq", "1000000", "--device", "cpu"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    line = next((line for line in proc.stdout if line.startswith("step ")), "")
    elapsed = time.time() - start
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    step = int(line.split()[1].split("/")[0])
    assert 0 < step < 1_000_000 and "updates/s" in line and "ETA" in line and "last eval none yet" in line, line
    assert elapsed < 30, elapsed  # about 5 s after the first update, plus the start-up
    assert proc.returncode == 130 and "checkpoint saved" in stdout, stderr


def test_ctrl_c_saves_a_checkpoint_that_resumes(small_datasets, tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "cql_mt_noshare.py"),
            "--datasets",
            *small_datasets,
            "--total-steps",
            "100000",
            "--eval-freq",
            "100000",
            *TINY,
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    for line in proc.stdout:  # wait until training is under way: the first progress line
        if line.startswith("step "):
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "checkpoint saved" in stdout
    ckpt = torch.load(tmp_path / "runs/cql_mt_noshare__custom__1/checkpoint.pt", weights_only=False)
    assert ckpt["step"] >= 1
    logged = scalars(str(tmp_path / "runs/cql_mt_noshare__custom__1"), "losses/critic_loss")  # --log-freq 5
    assert logged[-1][0] == ckpt["step"] // 5 * 5, (logged[-1], ckpt["step"])  # every loss kept
    out = run_script(
        "cql_mt_noshare",
        "--datasets",
        *small_datasets,
        "--total-steps",
        str(ckpt["step"] + 5),
        "--eval-freq",
        "100000",
        "--resume",
        *TINY,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert f"resumed cql_mt_noshare__custom__1 at step {ckpt['step']}" in out.stdout


def test_divergence_stops_and_keeps_the_last_good_checkpoint(small_datasets, tmp_path, monkeypatch, capsys):
    m = load_module("cql_mt_noshare")
    real = m.cql_losses
    calls = {"n": 0}

    def diverging(*a, **k):
        losses, stats = real(*a, **k)
        calls["n"] += 1
        if calls["n"] > 12:  # the critic loss blows up after 12 good steps
            losses["critic"] = losses["critic"] * float("nan")
        return losses, stats

    monkeypatch.setattr(m, "cql_losses", diverging)
    monkeypatch.chdir(tmp_path)
    args = m.Args(
        datasets=tuple(small_datasets),
        total_steps=40,
        checkpoint_freq=10,
        eval_freq=1000,
        log_freq=5,
        hidden_dim=32,
        n_hidden=2,
        batch_size=16,
        cql_n_actions=2,
    )
    with pytest.raises(SystemExit) as exit_info:
        m.main(args)
    assert exit_info.value.code == 3
    assert "diverged" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "runs/cql_mt_noshare__custom__1/checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 10  # the last checkpoint before the NaN, not after
    assert all(torch.isfinite(v).all() for v in ckpt["critic"].values())


# ---------------------------------------------------------------- bad input: one line, non-zero exit
def test_bad_input_gets_one_clear_line(small_datasets, tmp_path):
    """Every case on one script (the loader and checks are identical in all, test_parity.py)."""
    script = "cql_mt_noshare"
    bad_obs = str(tmp_path / "bad_obs.npz")
    with np.load(small_datasets[0]) as npz:
        data = {k: npz[k] for k in npz.files}
    data["observations"], data["next_observations"] = data["observations"][:, :11], data["next_observations"][:, :11]
    np.savez(bad_obs, **data)
    cases = [
        (["--datasets", str(tmp_path / "missing.npz"), *small_datasets[1:]], "dataset file not found"),
        (["--datasets", str(tmp_path), *small_datasets[1:]], "is a directory; a dataset is one .npz file per task"),
        (["--tasks", "run_forward", "fly"], "unknown task 'fly'"),
        (["--datasets", bad_obs, *small_datasets[1:]], "observations have shape (600, 11), but mt-walker2d's have 17"),
        (
            ["--datasets", small_datasets[1], small_datasets[0], small_datasets[2]],
            "holds run_backward data but was given for task run_forward",
        ),
        (["--datasets", *small_datasets[:2]], "--datasets needs one file per task (3), got 2"),
        (["--mixture", "huge"], "unknown mixture 'huge'"),
        (["--datasets", *small_datasets, "--total-steps", "0"], "--total-steps must lie in [1, inf), got 0"),
        (["--datasets", *small_datasets, "--gamma", "1"], "--gamma must lie in [0, 1), got 1.0"),
        (["--datasets", *small_datasets, "--tau", "0"], "--tau must lie in (0, 1], got 0.0"),
        (["--datasets", *small_datasets, "--q-lr", "-1e-4"], "--q-lr must lie in (0, inf)"),
        (["--datasets", *small_datasets, "--policy-lr", "nan"], "--policy-lr must lie in (0, inf), got nan"),
        (["--datasets", *small_datasets, "--seed", "-1"], "--seed must lie in [0, 4294967295]"),
        (["--datasets", *small_datasets, "--device", "tpu"], "--device must be auto, cpu or cuda"),
        (["--datasets", *small_datasets, "--resume"], "--resume: no checkpoint"),
    ]
    cds_cases = [
        (
            ["--datasets", *small_datasets, "--cds-percentile", "150"],
            "--cds-percentile must lie in [0, 100], got 150.0",
        ),
        (["--datasets", *small_datasets, "--cds-percentile", "-5"], "--cds-percentile must lie in [0, 100], got -5.0"),
        (["--datasets", *small_datasets, "--cds-percentile", "nan"], "--cds-percentile must lie in [0, 100], got nan"),
        (
            ["--datasets", *small_datasets, "--cds-threshold-percentile", "101"],
            "--cds-threshold-percentile must lie in [0, 100], got 101.0",
        ),
        (["--datasets", *small_datasets, "--cds-candidates", "0"], "--cds-candidates must lie in [1, inf), got 0"),
    ]
    for run, (flags, message) in [(script, c) for c in cases] + [("cql_mt_cds", c) for c in cds_cases]:
        out = run_script(run, *flags, cwd=tmp_path)
        assert out.returncode == 2, (flags, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (flags, out.stderr)
        assert not os.path.exists(tmp_path / "runs"), flags  # nothing was created


@pytest.mark.parametrize("script", CQL_SCRIPTS)
def test_every_script_reports_a_missing_dataset(script, tmp_path):
    out = run_script(script, "--datasets", "nope1.npz", "nope2.npz", "nope3.npz", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip() == "error: dataset file not found: nope1.npz"


def test_an_existing_run_is_never_overwritten(small_datasets, tmp_path):
    flags = ["--datasets", *small_datasets, "--total-steps", "5", "--eval-freq", "1000", *TINY]
    assert run_script("cql_mt_noshare", *flags, cwd=tmp_path).returncode == 0
    again = run_script("cql_mt_noshare", *flags, cwd=tmp_path)
    assert again.returncode == 2 and "pass --resume" in again.stderr


@pytest.mark.parametrize("script", ["cql_mt_cds", "brac_mt_cds"])
def test_the_old_percentile_flag_still_works_with_a_notice(script, small_datasets, tmp_path):
    """--cds-percentile k, the old name, is the threshold at the (100 - k)th percentile: a run with k = 90 trains
    exactly as one with --cds-threshold-percentile 10 (the same losses, step for step)."""
    flags = ["--datasets", *small_datasets, "--total-steps", "12", "--eval-freq", "12", "--hidden-dim", "32",
             "--n-hidden", "2", "--batch-size", "16", "--eval-episodes", "1", "--cds-candidates", "16"]  # fmt: skip
    flags += ["--cql-n-actions", "2"] if script == "cql_mt_cds" else ["--behavior-warmup-steps", "4"]
    old = run_script(script, *flags, "--cds-percentile", "90", "--exp-name", "old", cwd=tmp_path)
    new = run_script(script, *flags, "--cds-threshold-percentile", "10", "--exp-name", "new", cwd=tmp_path)
    assert old.returncode == 0 and new.returncode == 0, old.stderr + new.stderr
    notice = "note: --cds-percentile 90 is now --cds-threshold-percentile 10 (the same threshold)"
    assert notice in old.stdout.splitlines() and "note:" not in new.stdout
    runs = {name: json.load(open(tmp_path / "runs" / f"{name}__custom__1" / "summary.json")) for name in ("old", "new")}
    assert runs["old"]["args"]["cds_threshold_percentile"] == 10.0 == runs["new"]["args"]["cds_threshold_percentile"]
    assert runs["old"]["final"] == runs["new"]["final"]  # the same seed, the same threshold: the same run


def test_a_run_resumes_only_at_its_own_threshold(small_datasets, tmp_path):
    flags = ["--datasets", *small_datasets, "--total-steps", "4", "--eval-freq", "4", *TINY]
    assert run_script("cql_mt_cds", *flags, cwd=tmp_path).returncode == 0
    more = ["--total-steps", "8", "--resume", "--cds-threshold-percentile", "50"]
    out = run_script("cql_mt_cds", *flags, *more, cwd=tmp_path)
    assert out.returncode == 2 and "was trained at --cds-threshold-percentile 10; pass it to continue" in out.stderr


def test_cds_needs_two_tasks(small_datasets, tmp_path):
    out = run_script("cql_mt_cds", "--tasks", "run_forward", "--datasets", small_datasets[0], cwd=tmp_path)
    assert out.returncode == 2 and "at least two --tasks" in out.stderr


def test_drop_unrouted_keeps_every_routed_candidate_and_nothing_past_the_largest_count():
    m = load_module("cql_mt_cds")
    candidates = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]])
    routed = torch.tensor([[False, True, False, True], [False, False, False, False], [True, False, False, False]])
    kept, kept_routed = m.drop_unrouted(candidates, routed)
    assert kept.shape == (3, 2)  # task 0 has the most routed candidates: 2
    assert kept[0].tolist() == [11, 13] and kept_routed[0].all()
    assert not kept_routed[1].any()  # nothing routed to task 1: its columns weigh zero
    assert kept[2, 0].item() == 30 and kept_routed[2].tolist() == [True, False]
    none_routed = m.drop_unrouted(candidates, torch.zeros_like(routed))
    assert none_routed[0].shape == (3, 0)
