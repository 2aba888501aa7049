# Thinking by iterating, the calibration (issue 28; experiments/thinking.py): running parity over bit strings.
# A looped model of one local attention layer (each position sees itself and the one before) must carry the
# parity one position per loop, so a string of n bits needs about n loops: trained on 16 bits with 20 loops and
# the progressive loss (Bansal et al. 2022), it should solve 32 and 64 bits with more test-time loops.
task = "parity"
models = ["looped"]
n_embd = 64
n_head = 4
n_prelude = 1
n_core = 1
n_coda = 1
attn_window = 2
loops = 20
loop_loss = "progressive"
progressive_alpha = 0.5
prefix_lm = False
steps = 3000
batch_size = 64
learning_rate = 1e-3
train_length = 16
test_lengths = [8, 16, 32, 64, 128]
test_loops = [1, 4, 8, 16, 20, 32, 64, 96, 128, 160]
test_problems = 256
