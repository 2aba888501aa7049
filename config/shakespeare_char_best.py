# Character Shakespeare, lowest validation loss we found on one GPU in about 25 s of training: the
# baby-GPT shape with Muon, dropout 0.25 and weight decay 0.2 against overfitting the 1M-character
# corpus, a long decay. Measured on an H100 (torch 2.11, seed 1337, 2026-11-25): best val 1.4545 at
# step 1500 (24.8 s of training). The target of 1.40 is not reached (see BENCHMARKS.md).
out_dir = "out/shakespeare_char_best"
dataset = "shakespeare_char"
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.25
batch_size = 64
max_iters = 1500
eval_interval = 250
eval_iters = 100
log_interval = 100
optimizer = "muon"
muon_lr = 0.02
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 100
schedule = "wsd"
decay_frac = 0.6
beta2 = 0.99
compile = True
weight_decay = 0.2
