# Continual learning: a policy that does arith (calc tool) and lookup learns by expert iteration with
# teacher help; at episode 128 the world renames the calculator from calc to compute.
# Measured (BENCHMARKS.md): a negative result. The policy learnt positional copying for one tool name,
# so the longer name breaks the copy too; arith stayed at 0% and lookup fell. See world_continual_names.py.
out_dir = "out/world_continual"
tasks = {"arith": {}, "lookup": {}}
changes = [(128, "arith", {"tool": "compute"})]
init_from = "imitate"
mode = "expert_iteration"
teacher_help = True
imitation_episodes = 500
imitation_iters = 200
clone_iters = 900
imitation_batch_size = 16
imitation_lr = 2e-3
n_layer = 2
n_head = 4
n_embd = 64
block_size = 192
episodes = 512
episodes_per_update = 32
updates_per_batch = 8
update_batch_size = 16
learning_rate = 5e-4
temperature_start = 0.7
temperature_end = 0.3
replay_recent_window = 128
replay_recent_fraction = 0.5
eval_interval = 64
eval_episodes = 50
