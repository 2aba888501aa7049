# rooms: imitate a small, noisy set of teacher transcripts (200 episodes, 30% random actions), then
# improve by expert iteration on the policy's own successful episodes (no teacher help).
# Expect held-out success to climb from the imitation level (episode 0 in metrics.jsonl) to >= 80%.
out_dir = "out/world_rooms"
tasks = {"rooms": {}}
init_from = "imitate"
mode = "expert_iteration"
teacher_help = False
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
episodes = 640
episodes_per_update = 32
updates_per_batch = 4
update_batch_size = 16
learning_rate = 5e-4
temperature_start = 1.0
temperature_end = 0.5
eval_interval = 160
eval_episodes = 100
