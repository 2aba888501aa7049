# experiments/swarm_learning.py at the size, for the 16-core GPU machine (policies imitate on cuda,
# every swarm runs on the CPU cores). The same policy recipes as the small CPU run, so the two compare.
# Sized to finish in ~7 minutes there (estimated from the CPU run); the deadline
# stops new runs at 400 s so the report is written in time whatever the machine does.
goals = 500              # arith: learning vs frozen, and the single learner at equal episodes
rooms_goals = 200        # a rooms episode costs ~8x an arith one
compare_goals = 200      # messages and guide runs
workers = 4
eval_goals = 100        # held-out seeds for one worker alone (rooms evaluations are the slow part)
throughput_workers = [1, 4, 8, 16]
throughput_goals = 30
jobs = 4
deadline = 400
policy_device = "cuda"
