# Thinking by iterating, on language (issue 28, experiment 4; a report, no target): a step-trained looped model
# on shakespeare_char at CPU size, against plain models of the same parameters (3 layers) and the same FLOPs per
# token at its 4 training loops (6 layers), with val loss at 1..16 test-time loops.
#   python experiments/loops.py --part=shakespeare --shakespeare_args="['config/thinking_language_cpu.py']" --device=cpu
out_dir = "out/thinking_language_cpu"
dataset = "shakespeare_char"
n_layer = 3
n_prelude = 1
n_core = 1
n_coda = 1
loops = 4
loop_loss = "progressive"
progressive_alpha = 0.5
eval_loops = [1, 2, 4, 8, 16]
n_head = 4
n_embd = 64
block_size = 64
dropout = 0.0
batch_size = 16
max_iters = 400
eval_interval = 100
eval_iters = 10
log_interval = 100
optimizer = "muon"
muon_lr = 0.04
learning_rate = 4e-3
min_lr = 3e-4
warmup_iters = 50
schedule = "wsd"
decay_frac = 0.6
beta2 = 0.99
