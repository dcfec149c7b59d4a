"""The benchmark runner: its grid and commands, skip/resume, and the report on hand-made runs."""
import json
import os
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

RUNNER = os.path.join(ROOT, "benchmark", "run.py")


def runner(*flags, cwd):
    return subprocess.run([sys.executable, RUNNER, *flags], capture_output=True, text=True, cwd=cwd, timeout=300)


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
    done = tmp_path / "runs" / "cql_noshare__imbalanced__1"
    done.mkdir(parents=True)
    (done / "summary.json").write_text(json.dumps({"finished": True}))
    cut = tmp_path / "runs" / "cql_cds__imbalanced__1"
    cut.mkdir()
    (cut / "checkpoint.pt").write_bytes(b"")
    out = runner("--print-commands", "--seeds", "1", "--mixtures", "imbalanced", cwd=tmp_path)
    commands = [shlex.split(line) for line in out.stdout.splitlines()]
    assert len(commands) == 8
    assert not any(c[c.index("--exp-name") + 1] == "cql_noshare" for c in commands)
    cds = [c for c in commands if c[c.index("--exp-name") + 1] == "cql_cds"]
    assert cds[0][-1] == "--resume"


def test_workdir_keeps_a_budget_apart(tmp_path):
    # the scripts write to <cwd>/runs/, so a run is looked for, and run, in <workdir>/runs/
    done = tmp_path / "w" / "runs" / "cql_noshare__imbalanced__1"
    done.mkdir(parents=True)
    (done / "summary.json").write_text(json.dumps({"finished": True}))
    out = runner("--print-commands", "--workdir", "w", "--seeds", "1", "--mixtures", "imbalanced", cwd=tmp_path)
    lines = out.stdout.splitlines()
    assert len(lines) == 8 and all(line.startswith("cd w && ") for line in lines)
    assert not any("--exp-name cql_noshare " in line for line in lines)

    # run mode: the script must find the interrupted run the runner found, i.e. run inside the workdir
    cut = tmp_path / "w" / "runs" / "cql_cds__imbalanced__1"
    cut.mkdir()
    (cut / "checkpoint.pt").write_bytes(b"")  # not loadable: the run stops right after finding it
    runner("--workdir", "w", "--seeds", "1", "--mixtures", "imbalanced", "--methods", "cql_cds", "--device", "cpu",
           cwd=tmp_path)
    log = (cut / "stdout.log").read_text()
    assert "error: --resume: cannot read the checkpoint runs/cql_cds__imbalanced__1/checkpoint.pt" in log, log


def test_longer_budget_and_sweep_methods(tmp_path):
    out = runner("--print-commands", "--budget", "cpu-20k", "--seeds", "1", "--mixtures", "imbalanced",
                 "--methods", "cql_cds_k50", "hcsac", "brac_cds_a0.1_k50", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cds, hcsac, brac = [shlex.split(line) for line in out.stdout.splitlines()]
    assert cds[cds.index("--total-steps") + 1] == "20000" and cds[cds.index("--cds-percentile") + 1] == "50"
    assert hcsac[hcsac.index("--steps-per-epoch") + 1] == "200" and hcsac[hcsac.index("--epochs") + 1] == "100"
    assert brac[brac.index("--alpha") + 1] == "0.1" and brac[brac.index("--share") + 1] == "cds"
    for budget, steps in (("cpu-20k", "20000"), ("cpu-40k", "40000"), ("cpu-80k", "80000")):
        out = runner("--print-commands", "--budget", budget, "--seeds", "2", "--mixtures", "imbalanced",
                     "--methods", "brac_cds", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        (brac,) = [shlex.split(line) for line in out.stdout.splitlines()]
        assert brac[brac.index("--total-steps") + 1] == steps and brac[brac.index("--seed") + 1] == "2"
        assert brac[brac.index("--n-hidden") + 1] == "2", "the longer budgets keep the cpu configuration"


def test_bad_input_is_one_clear_line(tmp_path):
    out = runner("--methods", "cql_nonsense", cwd=tmp_path)
    assert out.returncode != 0 and out.stderr.strip().startswith("error: unknown method 'cql_nonsense'")


def test_report_tables_curves_and_diagnostics(tmp_path):
    pytest.importorskip("matplotlib")
    from torch.utils.tensorboard import SummaryWriter

    tasks = ("run_forward", "run_backward", "jump")
    for method, base in (("cql_noshare", 100.0), ("cql_cds", 200.0)):
        for seed in (1, 2):
            run_dir = tmp_path / "runs" / f"{method}__imbalanced__{seed}"
            run_dir.mkdir(parents=True)
            evals = []
            for step in (1000, 2000):
                e = {"step": step, **{t: {"return": base + seed + step / 100, "normalized_score": 1.0} for t in tasks}}
                e["average_return"], e["average_normalized_score"] = base + seed + step / 100, 1.0
                evals.append(e)
            summary = {"finished": True, "steps_done": 2000, "final": evals[-1], "best": evals[-1], "evals": evals,
                       "datasets": {"jump": os.path.join(ROOT, "data", "jump_expert.npz")}}
            (run_dir / "summary.json").write_text(json.dumps(summary))
            if method == "cql_cds":
                writer = SummaryWriter(str(run_dir))
                for step in range(1, 9):  # last quarter: steps 7 and 8
                    writer.add_scalar("sharing/jump_to_run_forward", 0.1 * step, step)
                    writer.add_scalar("cds/run_forward/q_own", 10.0, step)
                writer.close()
    results = tmp_path / "results"
    out = runner("--mode", "report", "--mixtures", "imbalanced", "--methods", "cql_noshare", "cql_cds",
                 "--seeds", "1", "2", "--results-dir", str(results), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    table = (results / "results.md").read_text()
    assert "| cql_noshare | 2 | 2000 | 121.5 ± 0.5 |" in table  # final return mean ± std over seeds 1, 2
    assert "| cql_cds | 2 | 2000 | 221.5 ± 0.5 |" in table
    assert "| cql_noshare | 116.5 ± 0.5 |" in table  # the mean of the last evaluations (1000 and 2000), over seeds
    assert "jump → run_forward" in table and "0.750 ± 0.000" in table  # the mean of 0.7 and 0.8
    assert (results / "curves_imbalanced.png").stat().st_size > 1000
    saved = json.loads((results / "cql_cds__imbalanced__1.json").read_text())
    assert saved["diagnostics"]["sharing/jump_to_run_forward"]["last_quarter"] == pytest.approx(0.75)
    assert ROOT not in json.dumps(saved)  # repository-relative paths only
    assert saved["command"].startswith("python cql_mt_cds.py --exp-name cql_cds")


def test_mean_std_gives_no_spread_for_one_seed():
    import importlib.util
    spec = importlib.util.spec_from_file_location("benchmark_run", RUNNER)
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    assert run.mean_std([1.0, 2.0]) == "1.5 ± 0.5"
    assert run.mean_std([3.0, float("nan"), None]) == "3.0"  # one finite value: its mean, no "± 0.0"
    assert run.mean_std([float("nan")]) == "n/a"
