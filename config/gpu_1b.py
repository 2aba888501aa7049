# A ~1.1B-parameter µLM (36 layers x 1536, block 1024) trained within the 32 GB µLM budget on one GPU:
# activation checkpointing per block, Muon (one momentum buffer per matrix, where AdamW keeps two),
# bf16 autocast, torch.compile. bench.py --parts=gpu_1b measures its peak memory and MFU (BENCHMARKS.md).
out_dir = "out/gpu_1b"
dataset = "shakespeare"
n_layer = 36
n_head = 12
n_embd = 1536
block_size = 1024
dropout = 0.0
checkpoint_activations = True
optimizer = "muon"
muon_lr = 0.02
learning_rate = 3e-4
min_lr = 3e-5
batch_size = 8
gradient_accumulation_steps = 64
max_iters = 5000
warmup_iters = 200
eval_interval = 500
eval_iters = 50
compile = True
