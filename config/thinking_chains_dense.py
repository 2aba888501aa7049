# Thinking by iterating, the headline, third form (issue 28; experiments/thinking.py): variable chains at one
# fixed length, each statement ended by `;` (so a position can tell a name from a value when the problem is read
# both ways) and training that scores every statement's variable, not only the asked one (a target at every
# statement, as running parity has at every bit). 32 statements per problem (100 tokens), trained on chains of
# 1-6 hops, tested to 24 hops at 1..64 loops; the test scores the asked variable only. The core is one layer and
# the progressive loss asks every loop to continue from a partial state. Baselines: the same three layers run
# once (same params) and 1 + 8 + 1 distinct layers (same compute at the 8 training loops).
task = "chains"
models = ["looped", "params", "compute"]
compile = True
n_embd = 128
n_head = 4
n_prelude = 1
n_core = 1
n_coda = 1
loops = 8
loop_loss = "progressive"
progressive_alpha = 0.5
prefix_lm = True
separators = True
every_statement = True
n_statements = 32
n_vars = 40
train_hops = [1, 6]
test_hops = [1, 2, 4, 6, 8, 12, 16, 20, 24]
steps = 20000
batch_size = 256
learning_rate = 1e-3
test_loops = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]
test_problems = 512
