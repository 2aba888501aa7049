# arith without a tool: the same model and budget as world_arith.py, but the teacher answers from memory.
# Expect far below world_arith.py: a 2-layer, 64-wide character model cannot multiply 3-digit numbers.
out_dir = "out/world_arith_notool"
tasks = {"arith": {"tool": ""}}
init_from = "imitate"
mode = "evaluate"
imitation_episodes = 1000
imitation_iters = 300
clone_iters = 900
imitation_batch_size = 16
imitation_lr = 2e-3
n_layer = 2
n_head = 4
n_embd = 64
block_size = 192
eval_episodes = 200
