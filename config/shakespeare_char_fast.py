# Character Shakespeare against the clock on one GPU: val <= 1.47 within 10 s of training steps
# (compile and evaluation reported apart; nanoGPT's baby GPT needs ~58 s on an H100 for 1.465).
# The baby-GPT shape, light dropout (the run is short, yet ~30 passes over the 1M characters),
# Muon for the matrices, a short warmup-stable-decay schedule.
# Run: python train.py config/shakespeare_char_fast.py; bench.py --suite=gpu --parts=ttl measures it.
out_dir = "out/shakespeare_char_fast"
dataset = "shakespeare_char"
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.1
batch_size = 64
max_iters = 1800
eval_interval = 100
eval_iters = 50
log_interval = 100
optimizer = "muon"
muon_lr = 0.03
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 50
schedule = "wsd"
decay_frac = 0.4
beta2 = 0.99
compile = True
