# Looped depth on character Shakespeare (experiments/loops.py --part=shakespeare trains this and two
# plain baselines: 4 layers = same parameters, 8 layers = same FLOPs per token at 3 loops).
# Looped: 1 prelude + 2 shared core layers applied 3 times + 1 coda; val loss also at 1..6 loops.
# Otherwise config/shakespeare_char_fast.py's recipe (Muon, 450-step WSD), without compile.
out_dir = "out/loops_shakespeare_char"
dataset = "shakespeare_char"
n_layer = 4
n_prelude = 1
n_core = 2
n_coda = 1
loops = 3
eval_loops = [1, 2, 4, 6]
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.1
batch_size = 64
max_iters = 450
eval_interval = 50
eval_iters = 50
log_interval = 50
optimizer = "muon"
muon_lr = 0.04
learning_rate = 4e-3
min_lr = 3e-4
warmup_iters = 50
schedule = "wsd"
decay_frac = 0.6
beta2 = 0.99
