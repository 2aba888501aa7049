# experiments/swarm_learning.py, throughput only (issue 13 number 5), for the 16-core GPU machine: episodes/min of
# an arith swarm from 1 to 16 workers, frozen vs learning after every goal vs after every 4 goals (target:
# learning keeps at least half the frozen episodes/min). The arith worker imitates on cuda (~1 min), then 15
# swarm runs on the CPU cores, one at a time, alone on the machine; the deadline stops new runs at 480 s so the
# JSON and PNG are written whatever the machine does. Estimated from the earlier GPU run: ~3-4 min.
parts = ["throughput"]
throughput_workers = [1, 2, 4, 8, 16]
throughput_goals = 40
eval_goals = 20
deadline = 480
policy_device = "cuda"
