# experiments/loops.py at CPU size (a few minutes on an idle core): variable chains trained on <= 3 hops,
# tested on up to 8. Too small to show much; the GPU config is the real run.
n_chains = 3
train_hops = 3
test_hops = 8
test_problems = 300
test_loops = [1, 2, 3, 4, 6, 8, 12]
n_embd = 64
n_head = 2
loops = 4
loops_min = 2
loops_max = 6
steps = 1500
batch_size = 32
learning_rate = 3e-3
device = "cpu"
