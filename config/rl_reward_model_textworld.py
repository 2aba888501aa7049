# issue 33, item 2, harder TextWorld: config/rl_reward_model_arith.py's question on the harder TextWorld games of
# config/world_textworld_hard.py (custom, 6 rooms, 6 objects, quests of 3 actions, 100 training games, 10 steps).
# The imitation policy is that config's: 2 x 64 chars, block 1024, 200 walkthrough episodes, 100 + 200 steps
# (EXPERIMENTS.md: ~20% held-out). Every learner acts as TextWorld's runs do: act=choose among the listed commands,
# choose_untried, choice_loss, temperature 0.3 -> 0.1; reward_model relaxes the choice itself (reward_model.py,
# act=choose) and is anchored at 4.0 by the choice loss on replayed successes, as on rooms. No teacher help.
# 96 training episodes of each learner, 3 seeds; held-out success on 40 games at 0 and 96. Every update scores
# each listed command of each trained state (the choice loss), so a batch of 16 took 76-110 s with 16 replay items
# per step in a probe: replay batches of 8 and 96 episodes keep the whole run near 75 min; reward_model's warm-up
# is 16 episodes, so it takes policy steps after all 6 batches (the first on a reward model fitted to 16 episodes).
# Measured (2026-12-08): from 20%, expert iteration 24.2 +- 7.2%, REINFORCE 23.3 +- 8.0%, reward_model 20.0 +- 7.5%.
#   OMP_NUM_THREADS=1 nice -n 10 python experiments/rl_reward_model.py config/rl_reward_model_textworld.py
# 81 min on one core of a 2-core CPU with the imitation (~3.5 min; the 150 games, ~0.6 s each, are made once).
out = "out/rl_reward_model_textworld"
results = "experiments/results/rl_reward_model_textworld.json"
task = "textworld"
task_options = {"challenge": "custom", "world_size": 6, "nb_objects": 6, "quest_length": 3, "games": 100,
                "max_steps": 10}
seeds = [1337, 1, 2]
imitation = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 1024, "imitation_episodes": 200,
             "imitation_iters": 100, "clone_iters": 200, "imitation_batch_size": 8, "act": "choose",
             "choose_untried": True}
run = {"episodes": 96, "episodes_per_update": 16, "updates_per_batch": 2, "update_batch_size": 8,
       "learning_rate": 3e-4, "temperature_start": 0.3, "temperature_end": 0.1, "eval_interval": 96,
       "eval_episodes": 40, "act": "choose", "choose_untried": True, "choice_loss": True, "replay_recent_window": 64}
reward_model = {"n_layer": 2, "n_head": 4, "n_embd": 64, "fit_steps": 8, "fit_batch_size": 32,
                "policy_batch_size": 8, "warmup_episodes": 16, "anchor": 4.0, "gumbel_temperature": 0.3}
