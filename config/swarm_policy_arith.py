# The swarm's worker policy: a character GPT imitating teacher transcripts of world.py's arith task,
# stopped early on purpose (step 950) so one sample at temperature 1 succeeds about half the time.
# Data: see BENCHMARKS.md, Swarm (4000 teacher episodes, seed 0). Expect val loss ~0.244 in ~15 min on a busy 2-core CPU.
out_dir = "out/policy_arith"
dataset = "arith_teacher"
device = "cpu"
n_layer = 3
n_head = 4
n_embd = 128
block_size = 160
dropout = 0.0
batch_size = 16
max_iters = 950
lr_decay_iters = 3000   # the cosine runs over 3000 steps; stopping at 950 keeps the policy half-trained
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 30
beta2 = 0.99
eval_interval = 100
eval_iters = 5
log_interval = 50
seed = 1
