"""Jump rollouts of a = pi_beta_mean + lam * (pi_mean - pi_beta_mean) for BRAC checkpoints: at what
deviation from the behaviour model does the walker fall?

Usage, from the folder holding the cpu-20k runs (lam = 0: pi_beta alone; 1: the actor):
    python benchmark/diagnostics/brac_jump_rollouts.py 0,0.5,1 runs/brac_noshare__imbalanced__{1,2,3} ...
Output of the README's runs: brac_jump_rollouts.txt.
"""
import os, sys, json, importlib.util, torch, numpy as np
torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("b", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "brac_mt_cds.py")); b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
args = b.Args(mixture="imbalanced")
data, _ = b.load_mixture(args)
all_obs = np.concatenate([data["observations"], data["next_observations"]]); mean, std = all_obs.mean(0), all_obs.std(0) + 1e-3
J, EP = 2, 5
lams = [float(x) for x in sys.argv[1].split(",")]
for d in sys.argv[2:]:
    ck = torch.load(f"{d}/checkpoint.pt", weights_only=False)
    actor = b.Actor(3, 256, 2); actor.load_state_dict(ck["actor"]); beh = b.BehaviorModel(3, 256, 2); beh.load_state_dict(ck["behavior"])
    out = []
    for lam in lams:
        envs = [b.make_env("jump") for _ in range(EP)]
        obs = np.stack([e.reset(seed=100 + k)[0] for k, e in enumerate(envs)])
        ret, done, length = np.zeros(EP), np.zeros(EP, bool), np.zeros(EP, int)
        ids = torch.full((EP,), J)
        while not done.all():
            o = torch.tensor((obs - mean) / std, dtype=torch.float32)
            with torch.no_grad():
                pa, pb = actor.act(o, ids), beh.act(o, ids)
            a = (pb + lam * (pa - pb)).clamp(-1, 1).numpy()
            for k, e in enumerate(envs):
                if done[k]: continue
                obs[k], r, term, trunc, _ = e.step(a[k]); ret[k] += r; length[k] += 1; done[k] = term or trunc
        out.append(f"lam {lam}: {ret.mean():6.0f} (len {length.mean():4.0f}, {int((ret > 1000).sum())}/{EP} >1000)")
    print(d.split("/")[-1], " | ".join(out), flush=True)
