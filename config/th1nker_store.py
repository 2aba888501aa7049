# Th1nker (issue 29), experiment (2) on a CPU: medium-term memory. Read 4 digits a and think (R P P P), then a
# context switch (a fresh random latent: the latent cannot carry a), read 4 digits b and think (R P P P), then
# ReadLatent over the LatentStore (L) or one more Process (P: the same block count), and Output a + b (0-18) at
# each position. Expected: without the store about 0.1 per digit (b known, a guessed); with it near 1.0 if the read works.
# Gradient windows: every stored step, or the last 2 (phase b only); the bytes autograd keeps are measured.
# ~5 min of a loaded core per seed.
experiment = "store"
n_embd = 32
n_head = 2
attn_window = 2
init_state = "random"
digits = 4
phase_steps = 3
store_windows = [0, 2]
steps = 300
batch_size = 64
learning_rate = 3e-3
test_problems = 512
