# Character-level Shakespeare on one GPU: nanoGPT's baby-GPT shape (6 layers, 6 heads, 384 wide,
# block 256) with µLM's block. nanoGPT reaches val ~1.47 with this shape; see BENCHMARKS.md for ours.
out_dir = "out/shakespeare_char"
dataset = "shakespeare_char"
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.2
batch_size = 64
max_iters = 5000
eval_interval = 250
eval_iters = 200
log_interval = 10
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
beta2 = 0.99
