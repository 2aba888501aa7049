# Issue 33, item 1: a character model with tokenizer shims (shim.py), the starting point of
# experiments/tokenizer_shim.py. cpu_quick's shape (4 x 128, block 64, Muon) for 600 steps; expect val ~1.6.
out_dir = "out/tokenizer_shim/char"
dataset = "shakespeare_char"
device = "cpu"
shim = True
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
dropout = 0.0
batch_size = 16
max_iters = 600
eval_interval = 100
eval_iters = 20
log_interval = 50
optimizer = "muon"
muon_lr = 0.04
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 30
schedule = "wsd"
decay_frac = 0.3
beta2 = 0.99
