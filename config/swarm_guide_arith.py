# The guide for the arith swarm: a larger character GPT (4 layers, 160 wide, ~1.2M parameters vs the
# workers' 0.6M) trained longer on the same teacher transcripts; it scores proposals by likelihood.
out_dir = "out/guide_arith"
dataset = "arith_teacher"
device = "cpu"
n_layer = 4
n_head = 4
n_embd = 160
block_size = 160
dropout = 0.0
batch_size = 16
max_iters = 1000
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 30
beta2 = 0.99
eval_interval = 200
eval_iters = 5
log_interval = 50
seed = 2
