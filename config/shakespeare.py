# Tiny Shakespeare with GPT-2 BPE (~304K train tokens): a small model, heavy dropout, since the corpus
# is tiny and overfits fast. Prepare with: python prepare.py --dataset=shakespeare
out_dir = "out/shakespeare"
dataset = "shakespeare"
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.2
batch_size = 32
max_iters = 2000
eval_interval = 200
eval_iters = 50
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 100
