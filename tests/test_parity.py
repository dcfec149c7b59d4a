"""The scripts are copies on purpose; these tests pin every shared piece to the same behaviour."""
import inspect

import numpy as np
import pytest
import torch

from conftest import PRESENT

# Pieces every training script carries, word for word.
SHARED = [
    "TASKS", "INIT_HEIGHT", "OBS_DIM", "ACT_DIM", "task_terminals", "task_rewards", "JumpReward", "make_env",
    "MIXTURES", "DATASET_KEYS", "DatasetError", "load_dataset", "relabel", "load_mixture", "load_reference",
    "LOG_STD_MIN", "LOG_STD_MAX", "per_task_mean", "gather", "sample_own", "evaluate", "normalized_score",
    "save_checkpoint", "rng_state", "set_rng_state", "keep_freed_memory", "fail",
]
# Pieces shared by the scripts whose networks take a task one-hot (HCSAC learns an embedding instead).
ONE_HOT = [s for s in PRESENT if s != "hcsac"]
CQL = [s for s in PRESENT if s != "brac_mt_cds"]  # the scripts built on CQL(H)


def source(module, name):
    obj = getattr(module, name)
    return inspect.getsource(obj) if callable(obj) or inspect.isclass(obj) else repr(obj)


@pytest.mark.parametrize("name", SHARED)
def test_shared_pieces_are_identical(modules, name):
    reference = source(modules["cql_mt_noshare"], name)
    for script in PRESENT:
        assert source(modules[script], name) == reference, f"{script}.{name} differs from cql_mt_noshare.{name}"


@pytest.mark.parametrize("name", ["task_features", "Actor", "TwinCritic"])
def test_one_hot_networks_are_identical(modules, name):
    for script in ONE_HOT:
        assert source(modules[script], name) == source(modules["cql_mt_noshare"], name), f"{script}.{name} differs"


def test_cql_loss_is_identical_in_cql_scripts(modules):
    for script in CQL:
        assert source(modules[script], "cql_losses") == source(modules["cql_mt_noshare"], "cql_losses"), script


def test_collection_script_shares_the_task_suite(modules):
    for name in ("TASKS", "INIT_HEIGHT", "task_terminals", "task_rewards", "JumpReward", "make_env"):
        assert source(modules["collect_datasets"], name) == source(modules["cql_mt_noshare"], name), name


def test_rewards_and_terminals_agree_on_random_inputs(modules):
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (500, 6)).astype(np.float32)
    next_obs = rng.normal(0, 1, (500, 17)).astype(np.float32)
    next_obs[:, 0] = rng.uniform(0.5, 2.5, 500)  # heights on both sides of every threshold
    x_velocity = rng.normal(0, 3, 500).astype(np.float32)
    for task in modules["cql_mt_noshare"].TASKS:
        ref_r = modules["collect_datasets"].task_rewards(task, actions, next_obs, x_velocity)
        ref_d = modules["collect_datasets"].task_terminals(task, next_obs)
        for script in PRESENT:
            np.testing.assert_array_equal(modules[script].task_rewards(task, actions, next_obs, x_velocity), ref_r)
            np.testing.assert_array_equal(modules[script].task_terminals(task, next_obs), ref_d)


def test_loader_and_relabelling_agree(modules, small_datasets):
    outputs = {}
    for script in PRESENT:
        task, data = modules[script].load_dataset(small_datasets[0])
        outputs[script] = (task, data, modules[script].relabel(data, modules[script].TASKS))
    task0, data0, (r0, d0) = outputs["cql_mt_noshare"]
    for script, (task, data, (r, d)) in outputs.items():
        assert task == task0
        for key in data0:
            np.testing.assert_array_equal(data[key], data0[key])
        np.testing.assert_array_equal(r, r0)
        np.testing.assert_array_equal(d, d0)


def test_networks_agree_for_the_same_weights(modules):
    torch.manual_seed(0)
    obs, ids, act = torch.randn(7, 17), torch.randint(0, 3, (7,)), torch.rand(7, 6) * 2 - 1
    ref_actor, ref_critic = modules["cql_mt_noshare"].Actor(3), modules["cql_mt_noshare"].TwinCritic(3)
    for script in ONE_HOT:
        actor, critic = modules[script].Actor(3), modules[script].TwinCritic(3)
        actor.load_state_dict(ref_actor.state_dict())
        critic.load_state_dict(ref_critic.state_dict())
        torch.testing.assert_close(actor(obs, ids), ref_actor(obs, ids))
        torch.testing.assert_close(critic(obs, ids, act), ref_critic(obs, ids, act))
        assert critic(obs, ids, act).shape == (2, 7)


def test_cql_loss_agrees_on_the_same_batch_and_weights(modules):
    losses = {}
    for script in [s for s in CQL if s in ONE_HOT]:
        m = modules[script]
        torch.manual_seed(0)
        actor, critic, target = m.Actor(3, 32, 2), m.TwinCritic(3, 32, 2), m.TwinCritic(3, 32, 2)
        batch = {"obs": torch.randn(3, 8, 17), "actions": torch.rand(3, 8, 6) * 2 - 1, "next_obs": torch.randn(3, 8, 17),
                 "rewards": torch.randn(3, 8), "terminals": (torch.rand(3, 8) < 0.1).float(),
                 "task_ids": torch.arange(3)[:, None].expand(3, 8), "weights": torch.ones(3, 8)}
        args = m.Args(cql_n_actions=4)
        out, _ = m.cql_losses(actor, critic, target, torch.zeros((), requires_grad=True),
                              torch.zeros((), requires_grad=True), batch, args)
        losses[script] = {k: v.item() for k, v in out.items()}
    first = next(iter(losses.values()))
    for script, values in losses.items():
        assert values == first, script


def test_evaluation_agrees(modules):
    results = {}
    for script in ONE_HOT:
        m = modules[script]
        torch.manual_seed(0)
        actor = m.Actor(3, 16, 1)
        returns = m.evaluate(actor, m.TASKS, 1, np.zeros(17), np.ones(17), seed=3, device=torch.device("cpu"))
        results[script] = {t: r.tolist() for t, r in returns.items()}
    first = next(iter(results.values()))
    assert all(r == first for r in results.values())


@pytest.mark.parametrize("name", ["sample_others", "conservative_q", "cds_route", "drop_unrouted"])
def test_cds_pieces_are_identical(modules, name):
    """BRAC + CDS routes with the CQL CDS script's rule, word for word."""
    if "brac_mt_cds" not in modules:
        pytest.skip("brac_mt_cds.py absent")
    assert source(modules["brac_mt_cds"], name) == source(modules["cql_mt_cds"], name)


def test_share_all_fractions_are_identical(modules):
    if "brac_mt_cds" not in modules:
        pytest.skip("brac_mt_cds.py absent")
    assert source(modules["brac_mt_cds"], "sharing_fractions") == source(modules["cql_mt_shareall"], "sharing_fractions")
