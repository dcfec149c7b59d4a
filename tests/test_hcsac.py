"""HCSAC: the heuristic relabelling rule, the embedding networks, and end-to-end runs of hcsac.py."""

import json
import os

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import load_module, run_script

TINY = [
    "--hidden-dim",
    "32",
    "--n-hidden",
    "2",
    "--batch-size",
    "32",
    "--steps-per-epoch",
    "10",
    "--eval-episodes",
    "1",
    "--log-freq",
    "10",
    "--device",
    "cpu",
]


def run_hcsac(*flags, cwd):
    """hcsac.py run as a user would, on one CPU thread: the tiny networks gain nothing from more, and on
    a busy machine idle OpenMP threads slow every step a hundredfold."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        return run_script("hcsac", *flags, cwd=cwd)


def active_sets(indices, sizes):
    """The flat active-dataset tensor split into one sorted list of buffer indices per task."""
    return [sorted(part.tolist()) for part in torch.split(indices, sizes.tolist())]


# ---------------------------------------------------------------------------------------------
# The relabelling rule on constructed Q-values
# ---------------------------------------------------------------------------------------------
def constructed_q():
    """28 transitions: D_0 = 0..20, D_1 = 21..24, D_2 = 25..27, with Q-hat under each task chosen by hand."""
    source = torch.tensor([0] * 21 + [1] * 4 + [2] * 3)
    q = torch.zeros(3, 28)
    # task 0: own Q = 0..20, so tau_0 = the 5% quantile = 1.0 exactly
    q[0, :21] = torch.arange(21.0)
    q[0, 21:25] = torch.tensor([1.0, 0.999, 5.0, -3.0])  # from D_1: 21 (at tau, added) and 23 added
    q[0, 25:] = torch.tensor([100.0, 1.0, 0.5])  # from D_2: 25 and 26 (at tau) added
    # task 1: own Q = 10, 20, 30, 40, so tau_1 = 10 + 0.15 * 10 = 11.5
    q[1, 21:25] = torch.tensor([10.0, 20.0, 30.0, 40.0])
    q[1, :21] = torch.arange(21.0)  # from D_0: 12..20 added
    q[1, 25:] = torch.tensor([0.0, 50.0, 11.0])  # from D_2: 26 added
    # task 2: own Q all 7, so tau_2 = 7
    q[2, 25:] = 7.0
    q[2, :21] = 6.9  # nothing from D_0
    q[2, 21:25] = torch.tensor([7.0, 7.0, 8.0, 6.0])  # from D_1: 21, 22 (at tau) and 23 added
    return q, source


def test_heuristic_relabel_adds_the_transitions_at_or_above_the_quantile(modules):
    hcsac = modules["hcsac"]
    q, source = constructed_q()
    indices, sizes, taus, added = hcsac.heuristic_relabel(q, source, 5.0)
    torch.testing.assert_close(taus, torch.tensor([1.0, 11.5, 7.0]))
    assert taus[0].item() == 1.0 and taus[2].item() == 7.0  # the boundary cases below sit exactly on tau
    expected = [
        list(range(21)) + [21, 23, 25, 26],  # Q_0 >= 1.0: 21 and 26 are exactly at tau_0
        list(range(12, 21)) + [21, 22, 23, 24] + [26],
        [21, 22, 23] + [25, 26, 27],  # 21 and 22 are exactly at tau_2
    ]
    assert active_sets(indices, sizes) == expected
    assert sizes.tolist() == [len(e) for e in expected]
    # added[j, i]: transitions of D_j added to task i; own data is never counted
    assert added.tolist() == [[0, 9, 0], [2, 0, 3], [2, 1, 0]]


def test_heuristic_relabel_keeps_all_own_data_and_uses_the_given_quantile(modules):
    hcsac = modules["hcsac"]
    q, source = constructed_q()
    # at k = 50 the median of D_0 is 10: D_1 and D_2 transitions need Q_0 >= 10 to join task 0
    indices, sizes, taus, _ = hcsac.heuristic_relabel(q, source, 50.0)
    assert taus[0].item() == 10.0
    assert active_sets(indices, sizes)[0] == list(range(21)) + [25]  # all of D_0, even below tau
    # k = 0: tau_i is the minimum over D_i
    _, _, taus, _ = hcsac.heuristic_relabel(q, source, 0.0)
    assert taus.tolist() == [0.0, 10.0, 7.0]


def test_heuristic_relabel_rebuilds_from_the_original_data(modules):
    hcsac = modules["hcsac"]
    q, source = constructed_q()
    first, first_sizes, _, _ = hcsac.heuristic_relabel(q, source, 5.0)
    q2 = q.clone()
    q2[0, [21, 23, 25, 26]] = -10.0  # the first call's additions to task 0 now fall below tau_0 ...
    q2[0, 22] = 50.0  # ... and another transition rises above it
    second, second_sizes, _, added = hcsac.heuristic_relabel(q2, source, 5.0)
    assert active_sets(first, first_sizes)[0] == list(range(21)) + [21, 23, 25, 26]
    assert active_sets(second, second_sizes)[0] == list(range(21)) + [22]
    assert added[:, 0].tolist() == [0, 1, 0]
    assert active_sets(second, second_sizes)[1:] == active_sets(first, first_sizes)[1:]


def small_buffer(modules, small_datasets):
    """The buffer main() builds, without normalisation, from the small datasets."""
    hcsac = modules["hcsac"]
    data, _ = hcsac.load_mixture(
        hcsac.Args(datasets=tuple(small_datasets), tasks=("run_forward", "run_backward", "jump"))
    )
    buf = {
        "obs": torch.tensor(data["observations"]),
        "next_obs": torch.tensor(data["next_observations"]),
        "actions": torch.tensor(data["actions"]),
        "rewards_all": torch.tensor(data["rewards_all"]),
        "terminals_all": torch.tensor(data["terminals_all"], dtype=torch.float32),
        "source": torch.tensor(data["source"]),
    }
    return data, buf


def test_shared_transitions_carry_the_target_tasks_reward_and_terminal(modules, small_datasets):
    hcsac = modules["hcsac"]
    data, buf = small_buffer(modules, small_datasets)
    q = torch.tensor(np.random.default_rng(0).normal(size=(3, len(data["rewards"]))), dtype=torch.float32)
    indices, sizes, _, added = hcsac.heuristic_relabel(q, buf["source"], 50.0)
    assert (added.sum(0) > 0).all()  # every task received transitions of the others
    for i, (task, members) in enumerate(zip(hcsac.WALKER_TASKS, torch.split(indices, sizes.tolist()))):
        rows = torch.zeros(3, len(members), dtype=torch.long)
        rows[i] = members
        batch = hcsac.gather(buf, rows, torch.ones(rows.shape))  # row i is read as task i
        idx = members.numpy()
        expected_r = hcsac.task_rewards(
            task, data["actions"][idx], data["next_observations"][idx], data["x_velocity"][idx]
        )
        expected_d = hcsac.task_terminals(task, data["next_observations"][idx])
        np.testing.assert_allclose(batch["rewards"][i].numpy(), expected_r, rtol=1e-6)
        np.testing.assert_array_equal(batch["terminals"][i].numpy(), expected_d.astype(np.float32))
        shared = data["source"][idx] != i
        # the stored reward is the source task's: shared transitions do not keep it (the HCSAC course code's bug)
        assert not np.allclose(batch["rewards"][i].numpy()[shared], data["rewards"][idx][shared])


def test_sample_batch_draws_from_the_active_datasets_only(modules):
    hcsac = modules["hcsac"]
    q, source = constructed_q()
    indices, sizes, _, _ = hcsac.heuristic_relabel(q, source, 5.0)
    n = len(source)
    buf = {
        "obs": torch.arange(n, dtype=torch.float32)[:, None].expand(n, 17),
        "next_obs": torch.zeros(n, 17),
        "actions": torch.zeros(n, 6),
        "rewards_all": torch.zeros(n, 3),
        "terminals_all": torch.zeros(n, 3),
        "source": source,
    }
    torch.manual_seed(0)
    batch, stats = hcsac.sample_batch(
        buf,
        {"indices": indices, "sizes": sizes},
        hcsac.Args(batch_size=2000, tasks=("run_forward", "run_backward", "jump")),
    )
    drawn = batch["obs"][:, :, 0].long()  # obs carries its own buffer index
    for i, members in enumerate(active_sets(indices, sizes)):
        assert set(drawn[i].tolist()) == set(members)  # all of D_i*, nothing else
    assert batch["task_ids"].tolist() == [[i] * 2000 for i in range(3)]
    for i, dst in enumerate(("run_forward", "run_backward", "jump")):  # the batch's sources, as drawn
        for j, src in enumerate(("run_forward", "run_backward", "jump")):
            if i != j:
                share = (source[drawn[i]] == j).float().mean().item()
                assert stats[f"batch/{dst}/from_{src}"].item() == pytest.approx(share)


def test_sample_batch_before_any_relabelling_is_the_no_sharing_batch(modules, small_datasets):
    hcsac, noshare = modules["hcsac"], modules["cql_mt_noshare"]
    data, buf = small_buffer(modules, small_datasets)
    sizes = torch.tensor(data["sizes"])
    args = hcsac.Args(batch_size=64, tasks=("run_forward", "run_backward", "jump"))
    torch.manual_seed(0)
    ours, _ = hcsac.sample_batch(buf, {"indices": torch.arange(len(data["rewards"])), "sizes": sizes}, args)
    torch.manual_seed(0)
    theirs, _ = noshare.sample_batch(buf, torch.cumsum(sizes, 0) - sizes, sizes, None, args)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)


def test_conservative_q_of_the_whole_dataset_in_chunks(modules):
    hcsac = modules["hcsac"]
    torch.manual_seed(0)
    critic = hcsac.TwinCritic(3, 32, 2, 8)
    buf = {"obs": torch.randn(50, 17), "actions": torch.rand(50, 6) * 2 - 1}
    q = hcsac.conservative_q_all(critic, buf, 3, chunk_size=7)
    assert q.shape == (3, 50) and not q.requires_grad
    for i in range(3):
        direct = critic(buf["obs"], torch.full((50,), i), buf["actions"]).min(0).values
        torch.testing.assert_close(q[i], direct)


# ---------------------------------------------------------------------------------------------
# Networks: with the identity embedding they are the one-hot networks of the CQL scripts
# ---------------------------------------------------------------------------------------------
def identity_embedding_copies(modules):
    hcsac, noshare = modules["hcsac"], modules["cql_mt_noshare"]
    torch.manual_seed(0)
    ref_actor, ref_critic, ref_target = (
        noshare.Actor(3, 32, 2),
        noshare.TwinCritic(3, 32, 2),
        noshare.TwinCritic(3, 32, 2),
    )
    copies = []
    for ref, cls in ((ref_actor, hcsac.Actor), (ref_critic, hcsac.TwinCritic), (ref_target, hcsac.TwinCritic)):
        net = cls(3, 32, 2, embed_dim=3)
        net.load_state_dict({**ref.state_dict(), "task_embedding.weight": torch.eye(3)})
        copies.append(net)
    return (ref_actor, ref_critic, ref_target), copies


def test_networks_with_identity_embedding_match_the_one_hot_networks(modules):
    (ref_actor, ref_critic, _), (actor, critic, _) = identity_embedding_copies(modules)
    obs, ids, act = torch.randn(7, 17), torch.randint(0, 3, (7,)), torch.rand(7, 6) * 2 - 1
    torch.testing.assert_close(actor(obs, ids), ref_actor(obs, ids))
    torch.testing.assert_close(actor.act(obs, ids), ref_actor.act(obs, ids))
    torch.manual_seed(1)
    sampled = actor.sample(obs, ids, 4)
    torch.manual_seed(1)
    torch.testing.assert_close(sampled, ref_actor.sample(obs, ids, 4))
    torch.testing.assert_close(critic(obs, ids, act), ref_critic(obs, ids, act))
    assert critic(obs, ids, act).shape == (2, 7)


def test_cql_loss_with_identity_embedding_matches_the_no_sharing_script(modules):
    hcsac, noshare = modules["hcsac"], modules["cql_mt_noshare"]
    refs, copies = identity_embedding_copies(modules)
    batch = {
        "obs": torch.randn(3, 8, 17),
        "actions": torch.rand(3, 8, 6) * 2 - 1,
        "next_obs": torch.randn(3, 8, 17),
        "rewards": torch.randn(3, 8),
        "terminals": (torch.rand(3, 8) < 0.1).float(),
        "task_ids": torch.arange(3)[:, None].expand(3, 8),
        "weights": torch.ones(3, 8),
    }
    values = []
    for m, nets in ((noshare, refs), (hcsac, copies)):
        torch.manual_seed(0)
        out, _ = m.cql_losses(
            *nets,
            torch.zeros((), requires_grad=True),
            torch.zeros((), requires_grad=True),
            batch,
            m.Args(cql_n_actions=4),
        )
        values.append({k: v.item() for k, v in out.items()})
    assert values[0] == values[1]


def test_actor_loss_does_not_train_the_critics_embedding(modules):
    hcsac = modules["hcsac"]
    critic = hcsac.TwinCritic(3, 32, 2)
    actions = (torch.rand(5, 6) * 2 - 1).requires_grad_()
    critic(torch.randn(5, 17), torch.randint(0, 3, (5,)), actions, detach_params=True).sum().backward()
    assert actions.grad is not None
    assert all(p.grad is None for p in critic.parameters())


# ---------------------------------------------------------------------------------------------
# End-to-end runs
# ---------------------------------------------------------------------------------------------
def scalars(run_dir):
    events = EventAccumulator(run_dir)
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def resumed_runs(small_datasets, tmp_path_factory):
    """5 epochs relabelling every 2 (at epochs 2 and 4): straight, and stopped after epoch 3 then resumed."""
    flags = [
        *TINY,
        "--datasets",
        *small_datasets,
        "--relabel-every",
        "2",
        "--eval-every-epochs",
        "100",
        "--torch-deterministic",
    ]
    straight, interrupted = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("interrupted")
    done = run_hcsac(*flags, "--epochs", "5", cwd=straight)
    first = run_hcsac(*flags, "--epochs", "3", cwd=interrupted)
    second = run_hcsac(*flags, "--epochs", "5", "--resume", cwd=interrupted)
    for proc in (done, first, second):
        assert proc.returncode == 0, proc.stderr
    return [
        (proc, os.path.join(cwd, "runs", "hcsac__custom__1"))
        for proc, cwd in ((done, straight), (first, interrupted), (second, interrupted))
    ]


def test_smoke_run_trains_relabels_evaluates_and_logs(modules, resumed_runs):
    hcsac = modules["hcsac"]
    (proc, run_dir), _, _ = resumed_runs
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["finished"] and summary["steps_done"] == 50
    assert [e["step"] for e in summary["evals"]] == [50]
    assert np.isfinite(summary["final"]["average_return"])
    # relabelling at the end of epochs 2 and 4 (never after the last one)
    assert [r["epoch"] for r in summary["relabels"]] == [2, 4]
    sizes = {"run_forward": 600, "run_backward": 400, "jump": 300}
    for record in summary["relabels"]:
        assert set(record["added"]) == {f"{s}_to_{d}" for s in sizes for d in sizes if s != d}
        for dst in sizes:
            added = sum(record["added"][f"{src}_to_{dst}"] for src in sizes if src != dst)
            assert record["active_size"][dst] == sizes[dst] + added  # D_i plus its additions, rebuilt
    assert proc.stdout.count("relabel @ epoch") == 2
    tags = scalars(run_dir)
    for tag in (
        "losses/critic_loss",
        "losses/actor_loss",
        "losses/cql_gap",
        "charts/SPS",
        "eval/average_return",
        "eval/jump/normalized_score",
        "relabel/run_forward_to_jump/added",
        "batch/run_backward/from_jump",
        "relabel/jump_to_run_backward/added_fraction",
        "relabel/run_forward/tau",
        "losses/entropy_alpha",
    ):
        assert tag in tags, tag
    assert len(tags["relabel/run_forward/tau"]) == 2 and len(tags["losses/critic_loss"]) == 5
    for key in ("jump_to_run_forward", "run_backward_to_jump"):  # counts, and their share of the source's dataset
        added = [float(r["added"][key]) for r in summary["relabels"]]
        assert tags[f"relabel/{key}/added"] == added
        fractions = [n / sizes[key.split("_to_")[0]] for n in added]
        assert tags[f"relabel/{key}/added_fraction"] == pytest.approx(fractions)
    # the updates happened: the actor is no longer its initialisation
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    torch.manual_seed(1)
    initial = hcsac.Actor(3, 32, 2, 16).state_dict()
    assert all(not torch.equal(initial[k], ckpt["actor"][k]) for k in initial)  # embedding included
    assert ckpt["active"]["sizes"].tolist() == [summary["relabels"][-1]["active_size"][t] for t in sizes]


def test_resume_across_a_relabelling_gives_the_straight_run(resumed_runs):
    (_, straight_dir), (first, _), (second, resumed_dir) = resumed_runs
    assert first.stdout.count("relabel @ epoch") == 1 and "resumed hcsac__custom__1 at step 30" in second.stdout
    straight = torch.load(os.path.join(straight_dir, "checkpoint.pt"), weights_only=False)
    resumed = torch.load(os.path.join(resumed_dir, "checkpoint.pt"), weights_only=False)
    assert resumed["step"] == straight["step"] == 50
    for key in ("actor", "critic", "critic_target"):
        for name, value in straight[key].items():
            assert torch.equal(resumed[key][name], value), f"{key}.{name}"
    assert torch.equal(resumed["active"]["indices"], straight["active"]["indices"])
    assert resumed["relabels"] == straight["relabels"]


def test_relabel_every_zero_is_mtcsac_and_never_relabels(small_datasets, tmp_path):
    proc = run_hcsac(
        *TINY,
        "--datasets",
        *small_datasets,
        "--epochs",
        "3",
        "--eval-every-epochs",
        "3",
        "--relabel-every",
        "0",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    run_dir = os.path.join(tmp_path, "runs", "hcsac__custom__1")
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["finished"] and summary["relabels"] == []
    assert "relabel" not in proc.stdout
    tags = scalars(run_dir)
    assert not [t for t in tags if t.startswith("relabel/")]
    assert tags["batch/jump/from_run_forward"] and all(v == 0 for t in tags if t.startswith("batch/") for v in tags[t])
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert torch.equal(ckpt["active"]["indices"], torch.arange(1300))
    assert ckpt["active"]["sizes"].tolist() == [600, 400, 300]


def test_divergence_stops_before_a_relabelling(small_datasets, tmp_path, monkeypatch, capsys):
    m = load_module("hcsac")
    real, calls = m.cql_losses, {"n": 0}

    def diverging(*a, **k):
        losses, stats = real(*a, **k)
        calls["n"] += 1
        if calls["n"] > 32:  # the critic loss blows up after 32 good steps, before the relabelling at step 40
            losses["critic"] = losses["critic"] * float("nan")
        return losses, stats

    monkeypatch.setattr(m, "cql_losses", diverging)
    monkeypatch.chdir(tmp_path)
    args = m.Args(
        datasets=tuple(small_datasets),
        epochs=6,
        steps_per_epoch=10,
        relabel_every=2,
        log_freq=100,
        checkpoint_every_epochs=3,
        eval_every_epochs=100,
        hidden_dim=32,
        n_hidden=2,
        batch_size=16,
        cql_n_actions=2,
        device="cpu",
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(SystemExit) as exit_info:
            m.main(args)
    finally:
        torch.set_num_threads(threads)
    assert exit_info.value.code == 3
    out = capsys.readouterr()
    # stopped at the end of epoch 4 (no log or checkpoint due there), before relabelling with NaN Q-values
    assert "diverged (a loss is NaN or inf) before step 40" in out.err
    assert out.out.count("relabel @ epoch") == 1
    ckpt = torch.load(tmp_path / "runs/hcsac__custom__1/checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 30 and [r["step"] for r in ckpt["relabels"]] == [20]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tasks", "run_forward", "fly"], "unknown task 'fly'"),
        (["--datasets", "missing.npz", "b.npz", "c.npz"], "dataset file not found: missing.npz"),
        (["--relabel-quantile", "-1"], "--relabel-quantile"),
        (["--relabel-quantile", "100.5"], "--relabel-quantile"),
        (["--relabel-every", "-1"], "--relabel-every"),
        (["--embed-dim", "0"], "--embed-dim must lie in [1, inf), got 0"),
        (["--steps-per-epoch", "0"], "--steps-per-epoch must lie in [1, inf)"),
        (["--datasets", "a_folder", "b.npz", "c.npz"], "a_folder is a directory"),
    ],
)
def test_bad_input_is_one_error_line(small_datasets, tmp_path, flags, message):
    datasets = [] if "--datasets" in flags else ["--datasets", *small_datasets]
    (tmp_path / "a_folder").mkdir()
    proc = run_hcsac(*TINY, *datasets, *flags, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()
