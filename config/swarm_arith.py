# Eight samples of a half-trained arithmetic policy (config/swarm_policy_arith.py) on 100 held-out goals.
# One worker alone solves about half; majority vote and the verifier should add well over 10 points.
# Results: BENCHMARKS.md, Swarm.
out_dir = "out/swarm_arith"
task = "arith"
num_goals = 100
workers = 8
checkpoints = ["out/policy_arith/ckpt.pt"]
temperatures = [1.0]
seed = 0
aggregators = ["majority", "verifier"]
device = "cpu"
reply_timeout = 120.0
