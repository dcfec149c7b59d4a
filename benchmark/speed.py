"""Gradient updates per second of each script at its defaults, fp32 and with each fast path.

    python benchmark/speed.py                                   # all scripts, all paths
    python benchmark/speed.py --scripts cql_mt_cds --paths fp32 bf16

Each measurement runs the script's own `main` (in a fresh process, on the shipped imbalanced
mixture, with evaluation switched off) and reads the SPS it logs to TensorBoard over the second half
of the steps, after warm-up. The floating-point operations of one update are counted with
torch.utils.flop_counter on the same code (matrix products: forward, backward and the CQL
samples), and set against this machine's measured matrix-multiply throughput.
Not a test: results go to benchmark/speed_results.{json,md}.
"""

import contextlib
import importlib.util
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Annotated

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    scripts: tuple[str, ...] = ("cql_mt_noshare", "cql_mt_shareall", "cql_mt_cds", "brac_mt_cds", "hcsac")
    """scripts to measure (those missing are skipped)"""
    paths: tuple[str, ...] = ("fp32", "bf16", "compile")
    """fast paths: fp32 (the default), bf16 (autocast), compile (torch.compile; on CUDA it uses CUDA graphs)"""
    steps: int = 40
    """gradient steps per measurement; SPS is read over the second half"""
    device: str = "auto"
    """`auto`, `cpu` or `cuda`"""
    out: str = os.path.join(ROOT, "benchmark", "speed_results")
    """results prefix (.json and .md are written)"""
    worker: Annotated[str, tyro.conf.arg(help_behavior_hint="(default: none)")] = ""
    """internal: measure one `script:path` in this process and print a JSON line"""


def load(script):
    spec = importlib.util.spec_from_file_location(script, os.path.join(ROOT, script + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[script] = module
    spec.loader.exec_module(module)
    return module


def matmul_throughput(device, dtype, n=2048, repeats=20):
    """Achieved FLOP/s of a large square matrix product (the machine's practical peak)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def run_main(module, steps, **overrides):
    """Run the script's main for `steps` updates without evaluation; returns its printed output."""
    module.evaluate = lambda actor, domain, tasks, episodes, *a, **k: {t: torch.zeros(episodes).numpy() for t in tasks}
    names = module.Args.__dataclass_fields__
    fields = {
        "total_steps": steps,
        "eval_freq": 10**9,
        "checkpoint_freq": 10**9,
        "log_freq": max(steps // 2, 1),
        "exp_name": "speed",
        "behavior_warmup_steps": 0,
        "actor_warmup_steps": 0,
        **overrides,
    }
    if "epochs" in names:  # hcsac counts epochs of steps_per_epoch updates
        fields.pop("total_steps")
        fields.update(epochs=2, steps_per_epoch=max(steps // 2, 1), eval_every_epochs=10**6)
        fields.pop("eval_freq")
    args = module.Args(**{k: v for k, v in fields.items() if k in names})
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        module.main(args)
    return buffer.getvalue()


def worker(spec, device_name, steps):
    script, path = spec.split(":")
    module = load(script)
    os.chdir(tempfile.mkdtemp())
    overrides = {"device": device_name, "bf16": path == "bf16", "compile": path == "compile"}
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run_main(module, 2, exp_name="speed_flops", **{**overrides, "compile": False})
    flops_per_step = counter.get_total_flops() / 2
    run_main(module, steps, **overrides)
    # the unrounded SPS the script logged to TensorBoard over the second half of the steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = [os.path.join("runs", d) for d in os.listdir("runs") if not d.startswith("speed_flops")]
    events = EventAccumulator(run_dir)
    events.Reload()
    sps = events.Scalars("charts/SPS")[-1].value
    print(json.dumps({"script": script, "path": path, "sps": sps, "flops_per_step": flops_per_step}))


def main(args: Args):
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    if args.worker:
        return worker(args.worker, device.type, args.steps)
    peak = {"fp32": matmul_throughput(device, torch.float32), "bf16": matmul_throughput(device, torch.bfloat16)}
    machine = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(f"{machine}: matmul {peak['fp32'] / 1e9:.0f} GFLOP/s fp32, {peak['bf16'] / 1e9:.0f} GFLOP/s bf16")
    rows = []
    for script in args.scripts:
        if not os.path.exists(os.path.join(ROOT, script + ".py")):
            continue
        for path in args.paths:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    f"{script}:{path}",
                    "--steps",
                    str(args.steps),
                    "--device",
                    device.type,
                ],
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                print(f"{script} {path}: failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            ref = peak["bf16" if path == "bf16" else "fp32"]
            row["gflop_per_step"] = row["flops_per_step"] / 1e9
            row["achieved_gflops"] = row["sps"] * row["flops_per_step"] / 1e9
            row["fraction_of_matmul_peak"] = row["achieved_gflops"] * 1e9 / ref
            rows.append(row)
            print(
                f"{script:16s} {path:8s} {row['sps']:7.2f} updates/s  {row['gflop_per_step']:6.1f} GFLOP/update  "
                f"{row['achieved_gflops']:6.0f} GFLOP/s = {100 * row['fraction_of_matmul_peak']:.0f}% of matmul peak"
            )
    result = {
        "machine": machine,
        "device": device.type,
        "torch": torch.__version__,
        "steps": args.steps,
        "matmul_gflops": {k: v / 1e9 for k, v in peak.items()},
        "rows": rows,
    }
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(
            f"Machine: {machine}; torch {torch.__version__}; matmul peak {peak['fp32'] / 1e9:.0f} GFLOP/s fp32, "
            f"{peak['bf16'] / 1e9:.0f} GFLOP/s bf16.\n\n"
        )
        f.write(
            "| script | path | updates/s | GFLOP/update | GFLOP/s | % of matmul peak |\n|---|---|---|---|---|---|\n"
        )
        for r in rows:
            f.write(
                f"| {r['script']} | {r['path']} | {r['sps']:.2f} | {r['gflop_per_step']:.1f} | "
                f"{r['achieved_gflops']:.0f} | {100 * r['fraction_of_matmul_peak']:.0f} |\n"
            )
    print(f"wrote {args.out}.json and .md")


if __name__ == "__main__":
    main(tyro.cli(Args))
