# experiments/loops.py on one GPU (about 5 minutes on an H100): variable chains (4 per problem),
# trained on <= 4 hops, tested on up to 12. Looped: 1 prelude + 2 core (x 3..9 loops, mean 6) + 1 coda.
n_chains = 4
train_hops = 4
test_hops = 12
test_problems = 1000
test_loops = [1, 2, 3, 4, 6, 8, 12, 16, 20, 24]
n_embd = 256
n_head = 4
n_core = 2
loops = 6
loops_min = 3
loops_max = 9
steps = 6000
batch_size = 128
learning_rate = 1e-3
device = "cuda"
