# experiments/swarm_learning.py at the size, for a 16-core machine (the GPU box: policies imitate
# on cuda, swarms run on the CPU cores). The same policy recipes as the small CPU run, so the two compare.
goals = 500
workers = 8
eval_goals = 200
throughput_workers = [1, 2, 4, 8, 16]
throughput_goals = 40
jobs = 3
policy_device = "cuda"
