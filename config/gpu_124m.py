# GPT-2 small's shape (124M parameters, 12 layers, 12 heads, 768 wide, block 1024) on one GPU:
# bf16 autocast, torch.compile, fused AdamW. Point `dataset` at a large prepared corpus
# (e.g. python prepare.py --dataset=fineweb-edu --max_tokens=1000000000); bench.py measures its speed.
out_dir = "out/gpu_124m"
dataset = "shakespeare"
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
dropout = 0.0
batch_size = 12
gradient_accumulation_steps = 40
max_iters = 5000
eval_interval = 500
eval_iters = 100
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 200
compile = True
