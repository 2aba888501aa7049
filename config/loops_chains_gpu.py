# experiments/loops.py on one GPU (about 8 minutes on an H100 with the three models in parallel processes):
# variable chains (2 per problem), trained on <= 2 hops, tested on up to 8. Looped: 1 prelude + 2 core
# (x 2..6 loops, mean 4) + 1 coda; baselines: 4 plain layers (same parameters), 10 (same compute at 4 loops).
# A plain 4-layer model of this width learns 1-2 hops after ~4000 steps at batch 128 (a probe, 2026-11-25).
n_chains = 2
n_vars = 32
train_hops = 2
test_hops = 8
test_problems = 1000
test_loops = [1, 2, 3, 4, 6, 8, 12, 16]
n_embd = 128
n_head = 4
n_core = 2
loops = 4
loops_min = 2
loops_max = 6
steps = 10000
batch_size = 128
learning_rate = 1e-3
warmup_iters = 200
device = "cuda"
