# experiments/loops.py with loops that are sometimes too few (about 8 minutes on an H100, the three models in
# parallel processes). The headline run (loops_chains_gpu.py) always had loops to spare: its 2-layer core ran
# 2..6 times on chains of <= 2 hops, so the state learned to settle after ~3 loops and more test-time loops
# added nothing. Here a 1-layer core runs 1..8 loops (independent of the problem, unlike loops_follow_hops,
# which never left the guess plateau) on chains of <= 4 hops: when the loops are fewer than the hops the
# loss is high, so every loop must make progress, which is what lets more loops solve longer chains.
# Baselines: 3 plain layers (same parameters), 6 (same compute at the mean 4 loops). Tested to 12 hops.
n_chains = 2
n_vars = 32
train_hops = 4
test_hops = 12
test_problems = 1000
test_loops = [1, 2, 3, 4, 6, 8, 10, 12, 16, 20]
n_embd = 128
n_head = 4
n_core = 1
loops = 4
loops_min = 1
loops_max = 8
steps = 10000
batch_size = 128
learning_rate = 1e-3
weight_decay = 0.0
warmup_iters = 200
device = "cuda"
