# Th1nker (issue 29), experiments (1) and (4) with a price per block (reward correct - 0.01 x blocks, not note
# 004's correct / blocks, which favoured stopping early and wrong) on a CPU: running parity of 1..6 bits (problems.py, BOS; PAD after
# each row), every layer seeing its own position and the one before, so a row of l bits needs about l loops.
# The blocks train on (R P O) x 8 (a loss at every Output); the probe imitates (R P) x 8 O S, then REINFORCE with
# reward correct - 0.01 x blocks. Expected: the probe reaches the fixed schedule's accuracy with fewer blocks on short
# rows (the target: <= 60% of the fixed 17 blocks), its blocks rising with the row's length. ~8 min of a core.
experiment = "parity"
n_embd = 32
n_head = 2
attn_window = 2
loops = 8
max_length = 6
init_state = "random"
steps = 1000
batch_size = 64
learning_rate = 3e-3
imitation_steps = 150
rl_steps = 400
rl_batch = 64
max_steps = 24
test_problems = 256
step_cost = 0.01
