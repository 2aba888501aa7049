# issue 33, item 2, a larger anchor: config/rl_reward_model_arith.py's run (read after it, which it overrides) with
# the reward model's policy steps anchored at weight 4 instead of config/rl_reward_model_arith_anchor.py's 1, the
# reward_model learner only (expert iteration and REINFORCE on the same code, imitation policy and seeds are in
# experiments/results/rl_reward_model_arith_anchor.json).
#   OMP_NUM_THREADS=1 nice -n 10 python experiments/rl_reward_model.py config/rl_reward_model_arith.py \
#       config/rl_reward_model_arith_anchor4.py
# About 8 min with the imitation (its weights are the anchor 1.0 run's: world.py's imitation is deterministic).
out = "out/rl_reward_model_arith_anchor4"
results = "experiments/results/rl_reward_model_arith_anchor4.json"
learners = ["reward_model"]
reward_model = {"n_layer": 2, "n_head": 4, "n_embd": 64, "fit_steps": 8, "fit_batch_size": 32,
                "policy_batch_size": 8, "warmup_episodes": 32, "anchor": 4.0}
