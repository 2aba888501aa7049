# Continual learning, second design: during imitation the calculator has a different name in every
# episode (calc, math, abacus, tally, sum), so the policy must read the name from "Tools: ..." and copy
# it. At episode 128 the world renames it to compute, a name never seen; lookup is the old task.
# Expect arith 0% right after the change, back to >= 90% of its last pre-change level ~200 episodes
# later, lookup >= 90% of its level throughout (replay keeps old lookup episodes in every batch).
out_dir = "out/world_continual_names"
tasks = {"arith": {"tool": ["calc", "math", "abacus", "tally", "sum"]}, "lookup": {}}
changes = [(128, "arith", {"tool": "compute"})]
init_from = "imitate"
mode = "expert_iteration"
teacher_help = True
imitation_episodes = 1000
imitation_iters = 200
clone_iters = 1000
imitation_batch_size = 16
imitation_lr = 2e-3
n_layer = 3
n_head = 4
n_embd = 64
block_size = 192
episodes = 448
episodes_per_update = 32
updates_per_batch = 8
update_batch_size = 16
learning_rate = 6e-4
temperature_start = 0.7
temperature_end = 0.3
replay_recent_window = 128
replay_recent_fraction = 0.5
eval_interval = 64
eval_episodes = 50
