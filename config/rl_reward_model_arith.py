# issue 33, item 2: arith (calc tool), an imitation policy stopped early (2 x 64 chars, 400 + 500 steps on 500
# teacher transcripts), then 128 episodes of each learner from it (no teacher help), 3 seeds; held-out success on
# 50 seeds at 0 and 128 (400 + 400 steps left the policy at 2%, 400 + 600 at 94%: no room either way).
# Sized for one core of a busy 2-core CPU (~30 min with the imitation).
out = "out/rl_reward_model_arith"
results = "experiments/results/rl_reward_model_arith.json"
task = "arith"
seeds = [1337, 1, 2]
imitation = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 192, "imitation_episodes": 500,
             "imitation_iters": 400, "clone_iters": 500}
run = {"episodes": 128, "episodes_per_update": 16, "updates_per_batch": 2, "update_batch_size": 16,
       "learning_rate": 5e-4, "temperature_start": 1.0, "temperature_end": 0.5, "eval_interval": 128,
       "eval_episodes": 50}
reward_model = {"n_layer": 2, "n_head": 4, "n_embd": 64, "fit_steps": 8, "fit_batch_size": 32,
                "policy_batch_size": 8, "warmup_episodes": 32}
