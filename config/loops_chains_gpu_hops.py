# experiments/loops.py, loops tied to each batch's difficulty (about 7 minutes on an H100, the three models in
# parallel processes): 2 chains, trained on <= 4 hops with 1 loop more than the batch's hops (2..5), tested
# on up to 12 hops at 1..20 loops. Baselines: 4 plain layers (same parameters), 8 (same compute at 3 loops).
n_chains = 2
n_vars = 32
train_hops = 4
test_hops = 12
test_problems = 1000
test_loops = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20]
n_embd = 128
n_head = 4
n_core = 2
loops = 3
loops_min = 2
loops_max = 5
loops_follow_hops = True
steps = 9000
batch_size = 128
learning_rate = 1e-3
weight_decay = 0.0
warmup_iters = 200
device = "cuda"
