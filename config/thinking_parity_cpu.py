# Thinking by iterating, the calibration on a CPU (issue 28; experiments/thinking.py): running parity after a
# BOS token. A looped model whose every layer sees only its own position and the one before (a local operator,
# like Bansal et al.'s recurrent convolutions) must carry the parity one position per loop, so 8 bits need about
# 8 loops and 32 bits about 32. Trained on 8 bits with 10 loops; tested on 8 to 64 bits at 1 to 160 loops.
# About 15 minutes of a CPU core per seed (the blocks compiled).
task = "parity"
models = ["looped"]
device = "cpu"
compile = True
n_embd = 32
n_head = 2
n_prelude = 1
n_core = 1
n_coda = 1
attn_window = 2
loops = 10
loop_loss = "progressive"
progressive_alpha = 0.5
prefix_lm = False
steps = 6000
batch_size = 64
learning_rate = 1e-3
train_length = 8
test_lengths = [8, 16, 32, 64]
test_loops = [1, 5, 10, 20, 40, 80, 160]
test_problems = 256
