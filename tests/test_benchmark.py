"""The benchmark runner: its grid and commands, skip/resume/continue, and the report on hand-made runs."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "benchmark", "run.py")


def runner(*flags, cwd):
    return subprocess.run(
        [sys.executable, RUNNER, *flags], check=False, capture_output=True, text=True, cwd=cwd, timeout=300
    )


def load_runner():
    spec = importlib.util.spec_from_file_location("benchmark_run", RUNNER)
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    return run


def fake_run(run_dir, steps_done=None, checkpoint=False, finished=True):
    """A run folder as a script leaves it: a summary.json (steps_done) and/or a checkpoint.pt (not loadable)."""
    run_dir.mkdir(parents=True)
    if steps_done is not None:
        (run_dir / "summary.json").write_text(json.dumps({"finished": finished, "steps_done": steps_done}))
    if checkpoint:
        (run_dir / "checkpoint.pt").write_bytes(b"")
    return run_dir


def test_print_commands_lists_the_grid_and_resumes_interrupted_runs(tmp_path):
    out = runner("--print-commands", "--seeds", "1", "2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    commands = [shlex.split(line) for line in out.stdout.splitlines()]
    assert len(commands) == (9 + 3) * 2  # every method on imbalanced, the CQL three on all-medium, 2 seeds
    first = commands[0]
    assert first[1].endswith("cql_mt_noshare.py") and "--total-steps" in first and "--resume" not in first
    assert sum("--cds-basic" in c for c in commands) == 2
    assert sum(c[c.index("--relabel-every") + 1] == "0" for c in commands if "--relabel-every" in c) == 2  # MTCSAC

    # a finished run is skipped, an interrupted one (a checkpoint, no finished summary) is resumed
    fake_run(tmp_path / "runs" / "cql_noshare__imbalanced__1", steps_done=10_000)
    fake_run(tmp_path / "runs" / "cql_cds__imbalanced__1", checkpoint=True)
    out = runner("--print-commands", "--seeds", "1", "--mixtures", "imbalanced", cwd=tmp_path)
    commands = [shlex.split(line) for line in out.stdout.splitlines()]
    assert len(commands) == 8
    assert not any(c[c.index("--exp-name") + 1] == "cql_noshare" for c in commands)
    cds = [c for c in commands if c[c.index("--exp-name") + 1] == "cql_cds"]
    assert cds[0][-1] == "--resume"


def test_workdir_keeps_a_budget_apart(tmp_path):
    # the scripts write to <cwd>/runs/, so a run is looked for, and run, in <workdir>/runs/
    fake_run(tmp_path / "w" / "runs" / "cql_noshare__imbalanced__1", steps_done=10_000)
    out = runner("--print-commands", "--workdir", "w", "--seeds", "1", "--mixtures", "imbalanced", cwd=tmp_path)
    lines = out.stdout.splitlines()
    assert len(lines) == 8 and all(line.startswith("cd w && ") for line in lines)
    assert not any("--exp-name cql_noshare " in line for line in lines)

    # run mode: the script must find the interrupted run the runner found, i.e. run inside the workdir
    cut = fake_run(tmp_path / "w" / "runs" / "cql_cds__imbalanced__1", checkpoint=True)  # stops right after finding it
    runner(
        "--workdir",
        "w",
        "--seeds",
        "1",
        "--mixtures",
        "imbalanced",
        "--methods",
        "cql_cds",
        "--device",
        "cpu",
        cwd=tmp_path,
    )
    log = (cut / "stdout.log").read_text()
    assert "error: --resume: " in log and "runs/cql_cds__imbalanced__1/checkpoint.pt" in log, log


def test_longer_budget_and_sweep_methods(tmp_path):
    flags = "--print-commands --budget cpu-20k --seeds 1 --mixtures imbalanced --methods"
    out = runner(*flags.split(), "cql_cds_k50", "hcsac", "brac_cds_a0.1_k50", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cds, hcsac, brac = [shlex.split(line) for line in out.stdout.splitlines()]
    assert cds[cds.index("--total-steps") + 1] == "20000" and cds[cds.index("--cds-threshold-percentile") + 1] == "50"
    assert hcsac[hcsac.index("--steps-per-epoch") + 1] == "200" and hcsac[hcsac.index("--epochs") + 1] == "100"
    assert brac[brac.index("--alpha") + 1] == "0.1" and brac[brac.index("--share") + 1] == "cds"
    for budget, steps in (("cpu-20k", "20000"), ("cpu-40k", "40000"), ("cpu-80k", "80000")):
        flags = f"--print-commands --budget {budget} --seeds 2 --mixtures imbalanced --methods brac_cds"
        out = runner(*flags.split(), cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        (brac,) = [shlex.split(line) for line in out.stdout.splitlines()]
        assert brac[brac.index("--total-steps") + 1] == steps and brac[brac.index("--seed") + 1] == "2"
        assert brac[brac.index("--n-hidden") + 1] == "2", "the longer budgets keep the cpu configuration"


@pytest.mark.parametrize("budget, mixture", [("cpu", "imbalanced"), ("dmc", "dmc-walker-medium"),
                                             ("dd", "door-drawer-imbalanced")])  # fmt: skip
def test_a_bf16_budget_is_its_budget_with_bf16_in_the_cql_scripts_and_hcsac(budget, mixture, tmp_path):
    methods = ["--methods", "cql_noshare", "cql_cds", "hcsac", "brac_cds"] if budget == "cpu" else []
    commands = {}
    for name in (budget, f"{budget}-bf16"):
        out = runner(
            "--print-commands", "--budget", name, "--seeds", "1", "--mixtures", mixture, *methods, cwd=tmp_path
        )
        assert out.returncode == 0, out.stderr
        commands[name] = [shlex.split(line) for line in out.stdout.splitlines()]
    assert len(commands[budget]) >= 4 and len(commands[budget]) == len(commands[f"{budget}-bf16"])
    for fp32, bf16 in zip(commands[budget], commands[f"{budget}-bf16"]):
        assert "--bf16" not in fp32
        if os.path.basename(fp32[fp32.index("--exp-name") - 1]) == "brac_mt_cds.py":
            assert bf16 == fp32  # BRAC gains little from bf16 on a CPU and stays in fp32
        else:
            assert [f for f in bf16 if f != "--bf16"] == fp32 and bf16.count("--bf16") == 1


def test_bad_input_is_one_clear_line(tmp_path):
    out = runner("--methods", "cql_nonsense", cwd=tmp_path)
    assert out.returncode != 0 and out.stderr.strip().startswith("error: unknown method 'cql_nonsense'")


def tables(text):
    """{heading: {method: {column: cell}}} of the markdown tables in a report (a heading is the line before a table)."""
    out, heading, header = {}, None, None
    for line in text.splitlines():
        if line.startswith("| method"):
            header = [c.strip() for c in line.strip("|").split("|")]
            out[heading] = {}
        elif line.startswith("| "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[heading][cells[0]] = dict(zip(header[1:], cells[1:]))
        elif line.strip() and not line.startswith("|"):
            heading = line.strip()
    return out


def table_with(text, words):
    """The one table whose heading holds `words`."""
    (found,) = [rows for heading, rows in tables(text).items() if heading and words in heading]
    return found


def test_report_tables_figures_and_diagnostics(tmp_path):
    pytest.importorskip("matplotlib")
    from torch.utils.tensorboard import SummaryWriter

    tasks = ("run_forward", "run_backward", "jump")
    for method, base, steps_done in (
        ("cql_noshare", 100.0, 10_000),
        ("cql_cds", 200.0, 10_000),
        ("cql_shareall", 300.0, 2_000),
    ):  # 2k: short of the cpu budget's 10k
        for seed in (1, 2):
            run_dir = tmp_path / "runs" / f"{method}__imbalanced__{seed}"
            run_dir.mkdir(parents=True)
            evals = []
            for step in (1000, 2000):
                e = {"step": step, **{t: {"return": base + seed + step / 100, "normalized_score": 1.0} for t in tasks}}
                e["average_return"], e["average_normalized_score"] = base + seed + step / 100, 1.0
                evals.append(e)
            summary = {
                "finished": True,
                "steps_done": steps_done,
                "final": evals[-1],
                "best": evals[-1],
                "evals": evals,
                "datasets": {"jump": os.path.join(ROOT, "data", "jump_expert.npz")},
            }
            (run_dir / "summary.json").write_text(json.dumps(summary))
            if method == "cql_cds":
                writer = SummaryWriter(str(run_dir))
                for step in range(1, 9):  # last quarter: steps 7 and 8
                    writer.add_scalar("cds/jump_to_run_forward/routed_fraction", 0.1 * step, step)
                    writer.add_scalar("batch/run_forward/from_jump", 0.05 * step, step)
                    writer.add_scalar("cds/run_forward/q_own", 10.0, step)
                    writer.add_scalar("losses/entropy_alpha", 0.5, step)  # not a diagnostic
                writer.close()
    results = tmp_path / "results"
    flags = "--mode report --mixtures imbalanced --methods cql_noshare cql_shareall cql_cds --seeds 1 2 --results-dir"
    out = runner(*flags.split(), str(results), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    # finished means the budget's steps done: the 2k runs are left out, though their summaries say finished
    assert "skipped (not finished): runs/cql_shareall__imbalanced__1" in out.stdout
    assert not (results / "cql_shareall__imbalanced__1.json").exists()
    table = (results / "results.md").read_text()
    assert "| cql_noshare | 2 | 10000 | 121.5 ± 0.5 |" in table  # final return mean ± std over seeds 1, 2
    assert "| cql_cds | 2 | 10000 | 221.5 ± 0.5 |" in table
    assert "| cql_noshare | 116.5 ± 0.5 |" in table  # the mean of the last evaluations (1000 and 2000), over seeds
    assert "cql_shareall" not in table
    # one key, one meaning: CDS's routed fraction and the make-up of the batch in tables of their own
    routed = table_with(table, "candidates routed to each target task")
    assert list(routed) == ["cql_cds"] and routed["cql_cds"]["jump → run_forward"] == "0.750 ± 0.000"
    assert routed["cql_cds"]["run_forward → jump"] == "n/a"  # not logged
    batch = table_with(table, "batch drawn from each source task")
    assert batch["cql_cds"]["jump → run_forward"] == "0.375 ± 0.000" and list(batch) == ["cql_cds"]
    assert (results / "curves_imbalanced.png").stat().st_size > 1000
    assert (results / "scores_imbalanced.png").stat().st_size > 1000
    assert "](scores_imbalanced.png)" in table and "](curves_imbalanced.png)" in table
    saved = json.loads((results / "cql_cds__imbalanced__1.json").read_text())
    assert saved["diagnostics"]["cds/jump_to_run_forward/routed_fraction"]["last_quarter"] == pytest.approx(0.75)
    assert saved["diagnostics"]["batch/run_forward/from_jump"]["last_quarter"] == pytest.approx(0.375)
    assert "losses/entropy_alpha" not in saved["diagnostics"]
    assert ROOT not in json.dumps(saved)  # repository-relative paths only
    assert saved["command"].startswith("python cql_mt_cds.py --exp-name cql_cds")


def test_report_joins_per_task_runs_into_one_row(tmp_path):
    """CSAC trains one task per run (csac_walk, csac_run); the report shows each seed's pair as one csac row, each
    task's column from its own run, the averages over both; a seed missing a task's run is left out."""
    pytest.importorskip("matplotlib")
    mixture, results = "dmc-walker-medium", tmp_path / "results"
    for method, seed, tasks in (("csac_walk", 1, ("walk",)), ("csac_run", 1, ("run",)), ("csac_walk", 2, ("walk",)),
                                ("mtcsac", 1, ("walk", "run"))):  # fmt: skip
        evals = []
        for step in (14_000, 15_000):
            e = {"step": step, **{t: {"return": {"walk": 500.0, "run": 100.0}[t] + step / 1000 + seed,
                                      "normalized_score": {"walk": 50.0, "run": 10.0}[t]} for t in tasks}}  # fmt: skip
            e["average_return"] = float(np.mean([e[t]["return"] for t in tasks]))
            e["average_normalized_score"] = float(np.mean([e[t]["normalized_score"] for t in tasks]))
            evals.append(e)
        run_dir = tmp_path / "runs" / f"{method}__{mixture}__{seed}"
        run_dir.mkdir(parents=True)
        summary = {"finished": True, "steps_done": 15_000, "final": evals[-1], "best": evals[0], "evals": evals,
                   "args": {"seed": seed}, "datasets": {}}  # fmt: skip
        (run_dir / "summary.json").write_text(json.dumps(summary))
    flags = ["--mode", "report", "--budget", "dmc", "--mixtures", mixture, "--seeds", "1", "2", "--results-dir"]
    out = runner(*flags, str(results), "--methods", "mtcsac", "csac_walk", "csac_run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    table = (results / "results.md").read_text()
    # one row, seed 1 only (seed 2 has no run task): walk 516, run 116, average 316, normalised (50 + 10) / 2
    assert "| csac | 1 | 15000 | 516.0 | 116.0 | 316.0 | 315.0 | 30.0 |" in table, table  # best: the first of equals
    assert "| mtcsac | 1 | 15000 | 516.0 | 116.0 |" in table and "csac_walk" not in table
    assert (results / "csac_walk__dmc-walker-medium__2.json").exists()  # each run's summary is kept


def test_diagnostics_tables_keep_each_key_to_its_meaning():
    run = load_runner()

    def runs(diagnostics):
        return [{"diagnostics": {tag: {"last_quarter": value} for tag, value in diagnostics.items()}}]

    summaries = {
        ("imbalanced", "cql_shareall"): runs({"batch/run_forward/from_jump": 0.04}),
        ("imbalanced", "cql_cds"): runs(
            {
                "batch/run_forward/from_jump": 0.3,
                "cds/jump_to_run_forward/routed_fraction": 0.9,
                "cds/run_forward/q_own": 80.0,
                "cds/run_forward/q_routed": 60.0,
                "cds/run_forward/routed_fraction": 0.2,
            }
        ),
        ("imbalanced", "hcsac"): runs({"relabel/jump_to_run_forward/added_fraction": 0.8, "relabel/jump/tau": 50.0}),
        ("imbalanced", "brac_noshare"): runs({"brac/run_forward/kl": 1.5}),
        ("imbalanced", "mtcsac"): runs({}),
    }
    methods = ["cql_shareall", "cql_cds", "brac_noshare", "mtcsac", "hcsac"]
    text = "\n".join(run.diagnostics_tables("imbalanced", methods, summaries))
    assert "sharing/" not in text
    batch = table_with(text, "Share of each target task's batch drawn from each source task")
    assert list(batch) == ["cql_shareall", "cql_cds"]
    assert batch["cql_shareall"]["jump → run_forward"] == "0.040" and batch["cql_cds"]["jump → run_forward"] == "0.300"
    assert batch["cql_cds"]["run_backward → run_forward"] == "n/a"
    routed = table_with(text, "CDS: fraction of each source task's candidates routed to each target task")
    assert list(routed) == ["cql_cds"] and routed["cql_cds"]["jump → run_forward"] == "0.900"
    q_hat = table_with(text, "Q-hat of each task's own batch")
    assert q_hat["cql_cds"]["run_forward Q-hat own / routed / fraction"] == "80.0 / 60.0 / 0.200"
    added = table_with(text, "HCSAC: share of each source task's whole dataset added to each target task")
    assert list(added) == ["hcsac"] and added["hcsac"]["jump → run_forward"] == "0.800"
    kl = table_with(text, "D_KL")
    assert list(kl) == ["brac_noshare"] and kl["brac_noshare"]["run_forward"] == "1.5"


def test_finished_is_the_budgets_steps_done(tmp_path):
    run = load_runner()
    short = fake_run(tmp_path / "a", steps_done=20_000, checkpoint=True)  # finished at 20k
    assert run.status(str(short), 20_000) == "finished"
    assert run.status(str(short), 40_000) == "interrupted"  # a longer budget resumes it
    flagless = fake_run(tmp_path / "b", steps_done=40_000, finished=False)
    assert run.status(str(flagless), 40_000) == "finished"  # the steps count, not the flag
    assert run.status(str(tmp_path / "c"), 10_000) == "new"
    # HCSAC counts in epochs: its budget is epochs x steps per epoch, as its command says
    cmd, _ = run.command("hcsac", "imbalanced", 1, run.Args(budget="cpu-20k"))
    assert run.planned_steps(cmd, "cpu-20k") == 20_000 == 100 * int(cmd[cmd.index("--steps-per-epoch") + 1])
    cmd, _ = run.command("hcsac", "imbalanced", 1, run.Args(budget="paper"))
    assert "--epochs" not in cmd and run.planned_steps(cmd, "paper") == 1_000_000  # the script's defaults
    cmd, _ = run.command("brac_cds", "imbalanced", 1, run.Args(budget="cpu-80k"))
    assert run.planned_steps(cmd, "cpu-80k") == 80_000

    # the runner: a 10k run is skipped by the cpu budget and resumed by cpu-20k
    fake_run(tmp_path / "runs" / "hcsac__imbalanced__1", steps_done=10_000, checkpoint=True)
    flags = ("--print-commands", "--mixtures", "imbalanced", "--methods", "hcsac", "--seeds", "1")
    assert runner(*flags, "--budget", "cpu", cwd=tmp_path).stdout == ""
    (line,) = runner(*flags, "--budget", "cpu-20k", cwd=tmp_path).stdout.splitlines()
    assert shlex.split(line)[-1] == "--resume"


def test_continue_from_copies_a_shorter_budgets_run_and_resumes_it(tmp_path):
    short = tmp_path / "short" / "runs"
    fake_run(short / "brac_cds__imbalanced__1", steps_done=20_000, checkpoint=True)  # a finished cpu-20k run
    fake_run(short / "brac_cds__imbalanced__2", steps_done=20_000, checkpoint=True)
    fake_run(short / "brac_noshare__imbalanced__1", steps_done=40_000, checkpoint=True)  # as long as cpu-40k already
    fake_run(tmp_path / "long" / "runs" / "brac_cds__imbalanced__2", checkpoint=True)  # in the workdir: goes on
    continued = ("--budget", "cpu-40k", "--workdir", "long", "--continue-from", "short", "--mixtures", "imbalanced")
    out = runner(
        "--print-commands", *continued, "--methods", "brac_noshare", "brac_cds", "--seeds", "1", "2", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    # seed by seed; brac_noshare seed 1 is skipped: its shorter run has this budget's steps already
    copy, cds_1, noshare_2, cds_2 = out.stdout.splitlines()
    assert copy == "mkdir -p long/runs && cp -r short/runs/brac_cds__imbalanced__1 long/runs/brac_cds__imbalanced__1"
    for line, method, seed, resumed in (
        (noshare_2, "brac_noshare", "2", False),  # nothing to continue from: a new run
        (cds_1, "brac_cds", "1", True),  # the copy, resumed to 40k
        (cds_2, "brac_cds", "2", True),  # already in the workdir: resumed from there, not copied over
    ):
        cd, cmd = line.split(" && ")
        cmd = shlex.split(cmd)
        assert cd == "cd long" and cmd[cmd.index("--exp-name") + 1] == method and cmd[cmd.index("--seed") + 1] == seed
        assert cmd[cmd.index("--total-steps") + 1] == "40000" and (cmd[-1] == "--resume") == resumed
    assert not (tmp_path / "long" / "runs" / "brac_cds__imbalanced__1").exists()  # printing copies nothing

    # run mode copies the folder, then the script resumes it inside the workdir (this checkpoint is not loadable)
    out = runner(*continued, "--methods", "brac_cds", "--seeds", "1", "--device", "cpu", cwd=tmp_path)
    assert "copied short/runs/brac_cds__imbalanced__1 to long/runs/brac_cds__imbalanced__1" in out.stdout, out.stderr
    copied = tmp_path / "long" / "runs" / "brac_cds__imbalanced__1"
    assert json.loads((copied / "summary.json").read_text())["steps_done"] == 20_000
    log = (copied / "stdout.log").read_text()
    assert "error: --resume: " in log and "runs/brac_cds__imbalanced__1/checkpoint.pt" in log, log
    assert (short / "brac_cds__imbalanced__1" / "summary.json").exists()  # the shorter budget's run is left as it was

    out = runner("--print-commands", "--continue-from", "nowhere", cwd=tmp_path)
    assert out.returncode != 0 and out.stderr.strip() == "error: --continue-from nowhere: no runs/ folder there"


def test_mean_std_gives_no_spread_for_one_seed():
    run = load_runner()
    assert run.mean_std([1.0, 2.0]) == "1.5 ± 0.5"
    assert run.mean_std([3.0, float("nan"), None]) == "3.0"  # one finite value: its mean, no "± 0.0"
    assert run.mean_std([float("nan")]) == "n/a"


def test_the_maze_grid_passes_its_domain_and_reports_its_goals(tmp_path):
    out = runner("--print-commands", "--budget", "maze", "--seeds", "1", "--mixtures", "maze-medium-undirected",
                 "maze-large-directed", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    commands = [shlex.split(line) for line in out.stdout.splitlines()]
    # the baselines and the CDS threshold sweep of both families on both mazes, HCSAC and MTCSAC on maze-medium
    assert len(commands) == 14 + 12
    for c in commands:  # the sweep sets its threshold: the p = 10 runs do not follow the mazes' default (90)
        name = c[c.index("--exp-name") + 1]
        if name.endswith(("_p10", "_k50", "_p90")):
            assert c[c.index("--cds-threshold-percentile") + 1] == {"p10": "10", "k50": "50", "p90": "90"}[name[-3:]]
    for c in commands:
        domain, mixture = c[c.index("--domain") + 1], c[c.index("--mixture") + 1]
        assert (domain, mixture) in {("maze-medium", "undirected"), ("maze-large", "directed")}
        length = c[c.index("--total-steps") + 1] if "--total-steps" in c else c[c.index("--epochs") + 1]
        assert c[c.index("--hidden-dim") + 1] == "128" and length in ("10000", "100")
    run = load_runner()
    assert run.tasks_of("maze-large-directed") == tuple(f"goal_{k}" for k in range(7))
    assert run.tasks_of("imbalanced") == ("run_forward", "run_backward", "jump")
    assert run.tasks_of("dmc-walker-medium-replay") == ("walk", "run")
    assert run.domain_flags("dmc-walker-medium-replay") == ["--domain", "dmc-walker", "--mixture", "medium-replay"]
