"""The shipped data: every file loads, and data/README.md tells the truth about it."""

import json
import os
import re

import numpy as np
import pytest

from conftest import ROOT, load_module

DATA = os.path.join(ROOT, "data")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(DATA, "reference.json")), reason="no shipped data")


def readme_rows():
    """Rows of the provenance table: | task | kind | file | transitions | episodes | return |."""
    text = open(os.path.join(DATA, "README.md")).read()
    rows = re.findall(
        r"^\| (\w+) \| ([\w-]+) \| `(\w+\.npz)` \| (\d+) \| (\d+) \| (-?[\d.]+) ± ([\d.]+) \|$", text, re.M
    )
    assert rows, "data/README.md has no provenance table"
    return rows


def test_every_mixture_file_loads():
    m = load_module("cql_mt_noshare")
    tasks, mixtures = m.DOMAINS["mt-walker2d"].tasks, m.DOMAINS["mt-walker2d"].mixtures
    for files in mixtures.values():
        for task, name in zip(tasks, files):
            source, data = m.load_dataset(os.path.join(DATA, name + ".npz"))
            assert source == task
            assert not (data["terminals"] & data["timeouts"]).any()
            assert (data["terminals"] | data["timeouts"])[-1]


def test_readme_sizes_and_returns_match_the_files():
    collect = load_module("collect_datasets")
    rows = readme_rows()
    names = {row[2] for row in rows}
    shipped = {f for f in os.listdir(DATA) if f.endswith(".npz")}
    assert names == shipped, "every shipped dataset is described, and only those"
    for task, kind, name, transitions, episodes, mean, std in rows:
        with np.load(os.path.join(DATA, name)) as npz:
            data = {k: npz[k] for k in npz.files}
        assert str(data["task"]) == task and name == f"{task}_{kind.replace('-', '_')}.npz"
        returns = collect.episode_returns(data)
        assert len(data["rewards"]) == int(transitions), name
        assert len(returns) == int(episodes), name
        assert float(mean) == pytest.approx(returns.mean(), abs=0.051), name
        assert float(std) == pytest.approx(returns.std(), abs=0.051), name


def test_readme_reference_returns_match_reference_json():
    ref = json.load(open(os.path.join(DATA, "reference.json")))["tasks"]
    text = open(os.path.join(DATA, "README.md")).read()
    for task, info in ref.items():
        row = re.search(rf"^\| {task} \| (\d+) \| (\d+) \| (-?[\d.]+) \| (-?[\d.]+) \|", text, re.M)
        assert row, f"no reference row for {task}"
        assert int(row.group(1)) == info["sac_steps"] and int(row.group(2)) == info["seed"]
        assert float(row.group(3)) == pytest.approx(info["random_return"], abs=0.051)
        assert float(row.group(4)) == pytest.approx(info["expert_return"], abs=0.051)


def test_shipped_data_stays_small():
    """The walker's data stays under 40 MiB; the mazes' (tests/test_maze_data.py) under 25 MB more, dm-control's
    (tests/test_dmc.py) under 20 MB."""
    walker = [
        os.path.join(d, f) for d, _, files in os.walk(DATA) for f in files if "maze-" not in d and "dmc-" not in d
    ]
    assert sum(os.path.getsize(f) for f in walker) < 40 * 2**20
