# issue 33, item 2, rooms: config/rl_reward_model_arith.py's question on world.py's rooms task (find the named item,
# perhaps in a box, in 3-5 rooms; 16 steps). The imitation policy is the swarm's rooms worker (EXPERIMENTS.md:
# 2 x 64 chars, block 256, 200 teacher transcripts with 30% random actions, 200 + 300 steps), well below the
# ceiling; then 128 episodes of each learner from it (no teacher help), 3 seeds; held-out success on 50 seeds at
# 0 and 128. reward_model is anchored (reward_model.py's anchor) at 4.0, the better on arith (81.3 +- 1.2% against
# 66.7 +- 24.7% for 1.0: experiments/results/rl_reward_model_arith_anchor4.json). A one-seed probe put the imitation
# policy at 34%: room both ways. About 15 min on one core of a 2-core CPU with the imitation.
#   OMP_NUM_THREADS=1 nice -n 10 python experiments/rl_reward_model.py config/rl_reward_model_rooms.py
out = "out/rl_reward_model_rooms"
results = "experiments/results/rl_reward_model_rooms.json"
task = "rooms"
seeds = [1337, 1, 2]
imitation = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 256, "imitation_episodes": 200,
             "teacher_noise": 0.3, "imitation_iters": 200, "clone_iters": 300}
run = {"episodes": 128, "episodes_per_update": 16, "updates_per_batch": 2, "update_batch_size": 16,
       "learning_rate": 5e-4, "temperature_start": 1.0, "temperature_end": 0.5, "eval_interval": 128,
       "eval_episodes": 50}
reward_model = {"n_layer": 2, "n_head": 4, "n_embd": 64, "fit_steps": 8, "fit_batch_size": 32,
                "policy_batch_size": 8, "warmup_episodes": 32, "anchor": 4.0}
