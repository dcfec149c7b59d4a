"""benchmark/speed.py: one measurement of one script, and its FLOP count against a count by hand."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_speed_worker_counts_the_cql_update_flops(modules):
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmark", "speed.py"),
            "--worker",
            "cql_mt_noshare:fp32",
            "--steps",
            "2",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["sps"] > 0

    # matrix products of one update at the defaults, in multiply-adds, counted by hand
    m = modules["cql_mt_noshare"]
    args = m.Args()
    domain = m.DOMAINS[args.domain]
    tasks, obs_dim, act_dim = domain.tasks, domain.obs_dim, domain.act_dim
    rows = len(tasks) * args.batch_size
    h, hidden = args.hidden_dim, args.n_hidden
    critic_in = obs_dim + len(tasks) + act_dim
    actor_in = obs_dim + len(tasks)
    critic_row = critic_in * h + (hidden - 1) * h * h + h  # one critic, one row, forward
    actor_row = actor_in * h + (hidden - 1) * h * h + h * 2 * act_dim
    cql_rows = rows * (1 + 3 * args.cql_n_actions)  # data action + n uniform + n pi(.|s) + n pi(.|s')
    critic_macs = 2 * (  # the twin critics
        rows * critic_row * 2  # Q(s, pi(s)) for the actor: forward and the gradient to the actions
        + rows * critic_row  # the target critic at (s', a')
        + cql_rows * (critic_row * 2 + critic_row - critic_in * h)  # forward, weight and input gradients
    )
    actor_macs = 2 * rows * (actor_row * 2 - actor_in * h)  # s and s' in one pass, forward and backward
    expected = 2 * (critic_macs + actor_macs)
    assert abs(row["flops_per_step"] / expected - 1) < 0.02, (row["flops_per_step"], expected)
