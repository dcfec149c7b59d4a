"""BRAC at 20k steps: how well pi_beta(.|s, jump) fits jump's data, overall and at the start of episodes;
and which running transitions CDS would route to jump now (their time step in the episode).

Usage, from the folder holding the cpu-20k runs:
    python benchmark/diagnostics/brac_jump_behavior_fit.py runs/brac_noshare__imbalanced__{1,2,3} ...
Output of the README's runs: brac_jump_behavior_fit.txt.
"""
import os, sys, json, importlib.util, torch, numpy as np
torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("b", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "brac_mt_cds.py")); b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
args = b.Args(mixture="imbalanced")
data, _ = b.load_mixture(args)
all_obs = np.concatenate([data["observations"], data["next_observations"]]); mean, std = all_obs.mean(0), all_obs.std(0) + 1e-3
src = data["source"]; J = 2
ends = data["terminals"] | data["timeouts"]
t = np.zeros(len(src), int)
for k in range(1, len(src)):
    t[k] = 0 if (ends[k - 1] or src[k] != src[k - 1]) else t[k - 1] + 1
obs_all = torch.tensor((data["observations"] - mean) / std, dtype=torch.float32); act_all = torch.tensor(data["actions"])
sel = src == J; early = sel & (t < 50)
print("jump episodes:", int((sel & (t == 0)).sum()), "running episodes:", int((~sel & (t == 0)).sum()))
for d in sys.argv[1:]:
    ck = torch.load(f"{d}/checkpoint.pt", weights_only=False)
    beh = b.BehaviorModel(3, 256, 2); beh.load_state_dict(ck["behavior"]); critic = b.TwinCritic(3, 256, 2); critic.load_state_dict(ck["critic"])
    with torch.no_grad():
        ids = torch.full((len(src),), J)
        lp = beh.log_prob(obs_all, ids, act_all)
        pb = beh.act(obs_all, ids)
        q = critic(obs_all, ids, act_all).min(0).values.numpy()
    rms = lambda m: ((pb[m] - act_all[m]) ** 2).mean().sqrt().item()
    thr = np.quantile(q[sel], 0.10)
    passed = (~sel) & (q >= thr)
    print(f"{d.split('/')[-1]:30s} logp(jump data) {lp[sel].mean():6.2f} (t<50: {lp[early].mean():6.2f}) | rms beta-a {rms(sel):.3f} (t<50: {rms(early):.3f}) "
          f"| running data over jump's 10th pct: {passed.mean()/(~sel).mean()*100:4.1f}%, of them t<50: {(passed & (t < 50)).sum()/max(passed.sum(),1)*100:4.1f}% "
          f"(all running t<50: {((~sel) & (t < 50)).sum()/(~sel).sum()*100:.1f}%)")
