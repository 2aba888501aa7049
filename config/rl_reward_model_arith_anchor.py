# issue 33, item 2, the anchor: config/rl_reward_model_arith.py's run (read after it, which it overrides) with the
# reward model's policy steps anchored by imitation of replayed successes at weight 1 (reward_model.py's anchor),
# so the straight-through gradient that collapsed the unanchored policy to 0% has a pull back to what worked.
#   OMP_NUM_THREADS=1 nice -n 10 python experiments/rl_reward_model.py config/rl_reward_model_arith.py \
#       config/rl_reward_model_arith_anchor.py
# The same imitation policy and seeds; expert iteration and REINFORCE run again beside it (same settings).
out = "out/rl_reward_model_arith_anchor"
results = "experiments/results/rl_reward_model_arith_anchor.json"
reward_model = {"n_layer": 2, "n_head": 4, "n_embd": 64, "fit_steps": 8, "fit_batch_size": 32,
                "policy_batch_size": 8, "warmup_episodes": 32, "anchor": 1.0}
