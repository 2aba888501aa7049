# Thinking by iterating, the headline (issue 28; experiments/thinking.py): variable chains at one fixed length.
# 24 statements per problem, trained on chains of 1-6 hops, tested to 24 hops at 1..64 loops. The problem is
# read both ways (prefix-LM: a statement can look up a variable defined after it), the core is one layer, and
# the progressive loss asks every loop to continue from a partial state. Baselines: the same three layers run
# once (same params) and 1 + 8 + 1 distinct layers (same compute at the 8 training loops).
task = "chains"
models = ["looped", "params", "compute"]
n_embd = 128
n_head = 4
n_prelude = 1
n_core = 1
n_coda = 1
loops = 8
loop_loss = "progressive"
progressive_alpha = 0.5
prefix_lm = True
n_statements = 24
n_vars = 32
train_hops = [1, 6]
test_hops = [1, 2, 4, 6, 8, 12, 16, 20, 24]
steps = 6000
batch_size = 128
learning_rate = 1e-3
test_loops = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]
test_problems = 512
