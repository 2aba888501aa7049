# rooms, as world_rooms.py (the same imitation recipe: 200 noisy teacher transcripts, imitated again in
# this run's own out_dir), then expert iteration with teacher help: a failed episode adds the teacher's
# action at the first state the policy went wrong.
# Expect held-out success 43% after imitation (episode 0), about 80% after 320 episodes.
out_dir = "out/world_rooms_help"
tasks = {"rooms": {}}
init_from = "imitate"
mode = "expert_iteration"
teacher_help = True
imitation_episodes = 200
teacher_noise = 0.3
imitation_iters = 200
clone_iters = 300
imitation_batch_size = 16
imitation_lr = 2e-3
n_layer = 3
n_head = 4
n_embd = 96
block_size = 256
episodes = 320
episodes_per_update = 32
updates_per_batch = 4
update_batch_size = 16
learning_rate = 2e-4
temperature_start = 1.0
temperature_end = 0.5
eval_interval = 160
eval_episodes = 100
