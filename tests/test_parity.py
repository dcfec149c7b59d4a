"""The scripts are copies on purpose; these tests pin every shared piece to the same behaviour."""

import ast
import dataclasses
import inspect
import json
import os
import signal

import numpy as np
import pytest
import torch

from conftest import PRESENT, ROOT, load_module

# Pieces every training script carries, word for word: the networks' constants, the loss helpers, evaluation, the
# domains section (every domain's record and code) and all the plumbing below the PLUMBING banner.
SHARED = [
    "LOG_STD_MIN",
    "LOG_STD_MAX",
    "per_task_mean",
    "gather",
    "evaluate",
    "Domain",
    "DATASET_KEYS",
    "FIRST_PROGRESS_S",
    "PROGRESS_EVERY_S",
    "DatasetError",
    "load_dataset",
    "load_mixture",
    "setup",
    "Run",
    "keep_freed_memory",
    "fail",
]
SHARING = [s for s in PRESENT if s != "cql_mt_noshare"]  # the scripts that share data log batch/<dst>/from_<src>
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


def test_everything_below_the_domains_banner_is_identical():
    """Not only the named pieces: the whole tail of every file, the domains section and the plumbing after it (from
    its banner to the end), is one text; the domains section comes after the training loop."""
    tails = {}
    for script in PRESENT:
        text = open(os.path.join(ROOT, script + ".py")).read()
        assert text.count("# ==== DOMAINS") == 1 and text.count("# ==== PLUMBING") == 1, script
        assert text.index("\ndef main(") < text.index("# ==== DOMAINS") < text.index("# ==== PLUMBING"), script
        tails[script] = text[text.index("# ==== DOMAINS") :]
    assert all(tail == tails["cql_mt_noshare"] for tail in tails.values())


def test_only_the_domains_section_names_a_domain(modules):
    """The method, the evaluation and the plumbing call a domain's record; they never compare a domain's name."""
    names = set(modules["cql_mt_noshare"].DOMAINS)
    for script in PRESENT:
        text = open(os.path.join(ROOT, script + ".py")).read()
        outside = text[: text.index("# ==== DOMAINS")] + text[text.index("# ==== PLUMBING") :]
        for node in ast.walk(ast.parse(outside)):
            if isinstance(node, ast.Compare):
                constants = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
                assert not names & set(constants), f"{script}, line {node.lineno}: compares a domain's name"
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                assert node.slice.value not in names, f"{script}, line {node.lineno}: picks a domain by name"


def test_sample_own_and_batch_sources_are_identical_where_present(modules):
    for name, scripts in (("sample_own", [s for s in PRESENT if s != "cql_mt_shareall"]), ("batch_sources", SHARING)):
        for script in scripts:
            assert source(modules[script], name) == source(modules[scripts[0]], name), f"{script}.{name}"


def test_common_flags_agree_and_every_numeric_flag_has_limits(modules):
    """A flag every script has means the same and defaults to the same; every number is range-checked."""
    fields = {s: {f.name: f for f in dataclasses.fields(modules[s].Args)} for s in PRESENT}
    common = set.intersection(*(set(f) for f in fields.values())) - {"exp_name"}
    assert {"seed", "device", "mixture", "tasks", "datasets", "batch_size", "gamma", "tau", "resume"} <= common
    for script in PRESENT:
        for name in common:
            assert fields[script][name].default == fields["cql_mt_noshare"][name].default, (script, name)
        for name, field in fields[script].items():
            numeric = field.type in (int, float, "int", "float") or "float | None" in str(field.type)
            assert (name in modules[script].LIMITS) == numeric, (script, name)
        for name, interval in modules[script].LIMITS.items():
            if name in modules["cql_mt_noshare"].LIMITS:
                assert interval == modules["cql_mt_noshare"].LIMITS[name], (script, name)


def test_setup_gives_the_same_buffer_in_every_script(modules, small_datasets):
    """Loading, relabelling, seeding and normalisation: the same tensors from every script's setup()."""
    outputs = {}
    for script in PRESENT:
        m = modules[script]
        device, buf, info = m.setup(m.Args(datasets=tuple(small_datasets), device="cpu"), m.LIMITS)
        outputs[script] = (buf, info, torch.rand(3))  # the same seed gives the same first random numbers
    buf0, info0, rand0 = outputs["cql_mt_noshare"]
    for script, (buf, info, rand) in outputs.items():
        assert buf.keys() == buf0.keys() and torch.equal(rand, rand0), script
        for key in buf0:
            torch.testing.assert_close(buf[key], buf0[key], rtol=0, atol=0)
        np.testing.assert_array_equal(info["obs_mean"], info0["obs_mean"])
        assert info["paths"] == info0["paths"] and info["reference"] == info0["reference"]


def test_run_saves_and_restores_every_kind_of_state(modules, tmp_path, monkeypatch):
    """Run walks one `state` dict for both save and resume: modules, optimisers, tensors, dicts and lists."""
    monkeypatch.chdir(tmp_path)
    for k, script in enumerate(PRESENT):
        m = modules[script]
        args = m.Args(exp_name=f"state{k}", device="cpu", tasks=("jump",), datasets=("x.npz",), eval_episodes=1)
        info = {"paths": ["x.npz"], "reference": {}, "obs_mean": np.zeros(17), "obs_std": np.ones(17), "sizes": [5]}

        def fresh():
            net = torch.nn.Linear(2, 2)
            return dict(net=net, optim=torch.optim.Adam(net.parameters()), t=torch.zeros(3), d={"a": 1}, lst=[])

        state = fresh()
        run = m.Run(args, torch.device("cpu"), info, 10, state=state, summary=("lst",))
        with torch.no_grad():
            state["net"].weight.add_(1.0)
            state["t"].fill_(7.0)
        state["d"]["a"], run.step = 2, 4
        state["lst"].append("x")
        run.save()
        run.write_summary(finished=False)
        again = fresh()
        resumed = m.Run(m.Args(**{**dataclasses.asdict(args), "resume": True}), torch.device("cpu"), info, 10, again)
        assert resumed.step == 4 and again["d"] == {"a": 2} and again["lst"] == ["x"]
        assert torch.equal(again["t"], torch.full((3,), 7.0))
        torch.testing.assert_close(again["net"].weight, state["net"].weight)
        assert json.load(open(tmp_path / "runs" / f"state{k}__custom__1" / "summary.json"))["lst"] == ["x"]
        for r in (run, resumed):  # before tmp_path goes: a writer's thread would flush into a removed folder
            r.writer.close()
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.mark.parametrize("name", ["Actor", "TwinCritic"])
def test_one_hot_networks_are_identical(modules, name):
    for script in ONE_HOT:
        assert source(modules[script], name) == source(modules["cql_mt_noshare"], name), f"{script}.{name} differs"


def test_cql_loss_is_identical_in_cql_scripts(modules):
    for script in CQL:
        assert source(modules[script], "cql_losses") == source(modules["cql_mt_noshare"], "cql_losses"), script


def test_collection_scripts_share_the_task_suites(modules):  # the collection scripts need no plumbing
    walker = ("WALKER_TASKS", "INIT_HEIGHT", "task_terminals", "task_rewards", "JumpReward", "make_env")
    for name in (*walker, "make_dmc_env"):
        assert source(modules["collect_datasets"], name) == source(modules["cql_mt_noshare"], name), name
    collect_maze = load_module("collect_maze")
    for name in ("MAZE_START", "GOAL_RADIUS", "MAZES", "goal_xy", "FixedGoalMaze", "make_maze_env"):
        assert source(collect_maze, name) == source(modules["cql_mt_noshare"], name), name
    for domain in ("maze-medium", "maze-large"):  # the collection's reward rule is the scripts' relabelling
        record, points = modules["cql_mt_noshare"].DOMAINS[domain], np.random.default_rng(0).uniform(-6, 6, (4000, 4))
        tasks, (rewards, terminals) = record.tasks, record.relabel({"next_observations": points}, record.tasks)
        np.testing.assert_array_equal(terminals, collect_maze.maze_rewards(domain, tasks, points))
        assert terminals.any() and (rewards == terminals).all()
    collect_door_drawer = load_module("collect_door_drawer")
    for name in ("DD_TASKS", "DD_STEPS", "DOOR", "DRAWER", "HAND_LOW", "HAND_HIGH", "DoorDrawer",
                 "make_dd_env", "dd_relabel"):  # fmt: skip
        assert source(collect_door_drawer, name) == source(modules["cql_mt_noshare"], name), name


def test_rewards_and_terminals_agree_on_random_inputs(modules):
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (500, 6)).astype(np.float32)
    next_obs = rng.normal(0, 1, (500, 17)).astype(np.float32)
    next_obs[:, 0] = rng.uniform(0.5, 2.5, 500)  # heights on both sides of every threshold
    x_velocity = rng.normal(0, 3, 500).astype(np.float32)
    for task in modules["cql_mt_noshare"].WALKER_TASKS:
        ref_r = modules["collect_datasets"].task_rewards(task, actions, next_obs, x_velocity)
        ref_d = modules["collect_datasets"].task_terminals(task, next_obs)
        for script in PRESENT:
            np.testing.assert_array_equal(modules[script].task_rewards(task, actions, next_obs, x_velocity), ref_r)
            np.testing.assert_array_equal(modules[script].task_terminals(task, next_obs), ref_d)


def test_loader_and_relabelling_agree(modules, small_datasets):
    outputs = {}
    for script in PRESENT:
        task, data = modules[script].load_dataset(small_datasets[0])
        walker = modules[script].DOMAINS["mt-walker2d"]
        outputs[script] = (task, data, walker.relabel(data, walker.tasks))
    task0, data0, (r0, d0) = outputs["cql_mt_noshare"]
    for task, data, (r, d) in outputs.values():
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
        batch = {
            "obs": torch.randn(3, 8, 17),
            "actions": torch.rand(3, 8, 6) * 2 - 1,
            "next_obs": torch.randn(3, 8, 17),
            "rewards": torch.randn(3, 8),
            "terminals": (torch.rand(3, 8) < 0.1).float(),
            "task_ids": torch.arange(3)[:, None].expand(3, 8),
            "weights": torch.ones(3, 8),
        }
        args = m.Args(cql_n_actions=4)
        out, _ = m.cql_losses(
            actor, critic, target, torch.zeros((), requires_grad=True), torch.zeros((), requires_grad=True), batch, args
        )
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
        returns = m.evaluate(
            actor, "mt-walker2d", m.WALKER_TASKS, 1, np.zeros(17), np.ones(17), seed=3, device=torch.device("cpu")
        )
        results[script] = {t: r.tolist() for t, r in returns.items()}
    first = next(iter(results.values()))
    assert all(r == first for r in results.values())


@pytest.mark.parametrize("name", ["sample_others", "conservative_q", "cds_route", "threshold_rule", "drop_unrouted"])
def test_cds_pieces_are_identical(modules, name):
    """BRAC + CDS routes with the CQL CDS script's rule, word for word."""
    if "brac_mt_cds" not in modules:
        pytest.skip("brac_mt_cds.py absent")
    assert source(modules["brac_mt_cds"], name) == source(modules["cql_mt_cds"], name)


def test_batch_sources_measure_the_share_of_each_batch_by_weight(modules):
    m = modules["cql_mt_shareall"]
    source = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    weights = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    share = m.batch_sources(source, weights, ("a", "b"))
    assert set(share) == {"batch/a/from_b", "batch/b/from_a"}  # no task is its own source
    assert share["batch/a/from_b"].item() == pytest.approx(1 / 3) and share["batch/b/from_a"].item() == 0.0


def test_no_function_is_longer_than_80_lines():
    """The training loop reads in one screen, and so does every piece it calls."""
    for script in [
        *PRESENT,
        "collect_datasets",
        "collect_maze",
        "collect_door_drawer",
        "benchmark/run",
        "benchmark/speed",
    ]:
        tree = ast.parse(open(os.path.join(ROOT, script + ".py")).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno < 80, f"{script}.{node.name}: {node.end_lineno - node.lineno + 1}"
