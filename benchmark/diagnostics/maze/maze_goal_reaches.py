"""What sharing can give a maze task: in each shipped maze file (one per task and mixture), how many transitions
reach each goal once relabelled to that goal (reward 1: s' within 0.45 of it), and in how many of the file's episodes.

Usage, from the repository root (reads data/maze-*/ only, no runs):
    python benchmark/diagnostics/maze/maze_goal_reaches.py
Output: maze_goal_reaches.txt. An episode here is a stretch of the file between two ends (a terminal of the file's
own task or a time limit), so an undirected episode, which roams until its time limit, counts once per own-goal visit.
"""

import importlib.util
import os
import sys

import numpy as np

if sys.argv[1:2] in (["-h"], ["--help"]):
    print(__doc__)
    sys.exit(0)
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
spec = importlib.util.spec_from_file_location("c", os.path.join(ROOT, "cql_mt_cds.py"))
c = importlib.util.module_from_spec(spec)
spec.loader.exec_module(c)

for domain in ("maze-medium", "maze-large"):  # the shipped mazes (AntMaze's data is converted by the user)
    goals = c.MAZES[domain][2]
    tasks = [f"goal_{k}" for k in range(len(goals))]
    for mixture in ("undirected", "directed"):
        print(f"\n# {domain}, {mixture}: rows = the file of task j, columns = goal i (relabelled)")
        print(f"{'file':<10} {'size':>6} {'episodes':>8} | transitions reaching goal i | episodes reaching goal i")
        for j in tasks:
            data = np.load(os.path.join(ROOT, "data", domain, f"{mixture}_{j}.npz"))
            reach = c.maze_relabel(domain, data, tasks)[1]  # (transitions, goals), True = reached
            ends = np.flatnonzero(data["terminals"] | data["timeouts"])
            starts = np.concatenate([[0], ends[:-1] + 1])
            episodes = np.logical_or.reduceat(reach, starts, axis=0).sum(0)
            cells = " ".join(f"{n:5d}" for n in reach.sum(0))
            print(f"{j:<10} {len(reach):6d} {len(ends):8d} | {cells} | " + " ".join(f"{n:4d}" for n in episodes))
