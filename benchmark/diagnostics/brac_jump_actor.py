"""On jump's states: how far the actor's action under jump's one-hot is from pi_beta, from the data, and from its own
action under the running tasks' one-hots; per BRAC run at 20k steps, beside the run's jump return.

Usage, from the folder holding the cpu-20k runs:
    python benchmark/diagnostics/brac_jump_actor.py runs/brac_noshare__imbalanced__{1,2,3} runs/brac_cds__imbalanced__{1,2,3} ...
Output of the README's runs: brac_jump_actor.txt.
"""
import os, sys, json, importlib.util, torch, numpy as np
torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("b", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "brac_mt_cds.py")); b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
args = b.Args(mixture="imbalanced")
data, _ = b.load_mixture(args)
all_obs = np.concatenate([data["observations"], data["next_observations"]]); mean, std = all_obs.mean(0), all_obs.std(0) + 1e-3
src = data["source"]; J = 2
sel = src == J
obs = torch.tensor((data["observations"][sel] - mean) / std, dtype=torch.float32); act = torch.tensor(data["actions"][sel])
rms = lambda x, y: ((x - y) ** 2).mean().sqrt().item()
for d in sys.argv[1:]:
    ck = torch.load(f"{d}/checkpoint.pt", weights_only=False)
    s = json.load(open(f"{d}/summary.json")); l5 = np.mean([e["jump"]["return"] for e in s["evals"][-5:]])
    actor = b.Actor(3, 256, 2); actor.load_state_dict(ck["actor"]); beh = b.BehaviorModel(3, 256, 2); beh.load_state_dict(ck["behavior"])
    critic = b.TwinCritic(3, 256, 2); critic.load_state_dict(ck["critic"])
    with torch.no_grad():
        pis = [actor.act(obs, torch.full((len(obs),), t)) for t in range(3)]
        pb = beh.act(obs, torch.full((len(obs),), J))
        ids = torch.full((len(obs),), J)
        # the critic's sensitivity: Q(s, pi_jump) - Q(s, a_data) and Q(s, pi_rf) under jump
        q = lambda a: critic(obs, ids, a).min(0).values
        qd, qj, qf, qb = q(act), q(pis[J]), q(pis[0]), q(pis[1])
    print(f"{d.split('/')[-1]:32s} step {ck['step']} jump last5 {l5:6.0f} | rms pi_j-beta {rms(pis[J],pb):.3f} pi_j-a {rms(pis[J],act):.3f} "
          f"pi_j-pi_rf {rms(pis[J],pis[0]):.3f} pi_j-pi_rb {rms(pis[J],pis[1]):.3f} | Q_jump(a) {qd.mean():.1f} (pi_j) {qj.mean():.1f} (pi_rf) {qf.mean():.1f} (pi_rb) {qb.mean():.1f}")
