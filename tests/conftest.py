"""Shared fixtures: the scripts imported as modules, and small real datasets made in a temp folder."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

# Tiny networks run fastest on one thread, and the suite must not fight itself for 2 cores.
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["cql_mt_noshare", "cql_mt_shareall", "cql_mt_cds", "brac_mt_cds", "hcsac"]
PRESENT = [s for s in SCRIPTS if os.path.exists(os.path.join(ROOT, s + ".py"))]


def load_module(name, path=None):
    """Import a top-level script by file name (each one stands alone)."""
    spec = importlib.util.spec_from_file_location(name, path or os.path.join(ROOT, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def modules():
    return {name: load_module(name) for name in PRESENT + ["collect_datasets"]}


def random_walk_dataset(task, n_steps, seed, scale=1.0):
    """A real dataset of `task`: Walker2d transitions under random actions (scaled to [-scale, scale])."""
    collect = load_module("collect_datasets")
    env = collect.make_env(task)
    rng = np.random.default_rng(seed)
    data, _ = collect.run_episodes(
        env, lambda o: scale * rng.uniform(-1, 1, 6).astype(np.float32), n_steps=n_steps, seed=seed
    )
    return data


@pytest.fixture(scope="session")
def small_datasets(tmp_path_factory):
    """One small .npz per task (a few hundred random-action transitions each)."""
    folder = tmp_path_factory.mktemp("data")
    paths = []
    for k, (task, n) in enumerate((("run_forward", 600), ("run_backward", 400), ("jump", 300))):
        data = random_walk_dataset(task, n, seed=k)
        path = str(folder / f"{task}.npz")
        np.savez_compressed(path, task=np.array(task), **data)
        paths.append(path)
    return paths


def run_script(script, *flags, cwd, timeout=600):
    """Run a script as a user would; returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script + ".py"), *flags],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
