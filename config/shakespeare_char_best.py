# Character Shakespeare, best validation loss on one GPU in about a minute of training: the baby-GPT
# shape with Muon, dropout against overfitting the 1M-character corpus, a long decay. Target val <= 1.40
# (nanoGPT's best with this shape is 1.465). Run: python train.py config/shakespeare_char_best.py
out_dir = "out/shakespeare_char_best"
dataset = "shakespeare_char"
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.2
batch_size = 64
max_iters = 5000
eval_interval = 250
eval_iters = 100
log_interval = 100
optimizer = "muon"
muon_lr = 0.02
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 100
schedule = "wsd"
decay_frac = 0.5
beta2 = 0.99
compile = True
