# Thinking by iterating, the headline at CPU size (issue 28; experiments/thinking.py): variable chains at one
# fixed length. 12 statements per problem (28 tokens with the query), trained on chains of 1-4 hops, tested to
# 12 hops (3x) at 1..48 loops. The problem is read both ways (prefix-LM: a statement can look up a variable
# defined after it), the core is one layer, the progressive loss asks every loop to continue from a partial
# state. Baselines: the same three layers run once (same params) and 1 + 6 + 1 distinct layers (same compute at
# the 6 training loops). About 25 minutes of 2-core CPU per model (the blocks compiled).
task = "chains"
models = ["looped"]
device = "cpu"
compile = True
n_embd = 64
n_head = 4
n_prelude = 1
n_core = 1
n_coda = 1
loops = 6
loop_loss = "progressive"
progressive_alpha = 0.5
prefix_lm = True
n_statements = 12
n_vars = 16
train_hops = [1, 4]
test_hops = [1, 2, 3, 4, 6, 8, 10, 12]
steps = 4000
batch_size = 64
learning_rate = 1e-3
test_loops = [1, 2, 4, 6, 8, 12, 16, 24, 32, 48]
test_problems = 256
