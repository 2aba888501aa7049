# Issue 11's TextWorld experiments 1-4 at the size one H100 + 16 CPU cores finish in about 8 minutes
# (experiments/textworld_suite.py; EXPERIMENTS.md, TextWorld). The game engine runs on the CPU cores,
# 12 runs at once; games (~1500) are generated first on all cores.
device = "cuda"
budget_s = 555               # the runs still going then are stopped; the report keeps their curves so far
choose_untried = True        # act=choose never repeats a command in one game state (EXPERIMENTS.md, TextWorld
                             # failures); experiment 1 at N = 100 / 300 / 1000: 59.5 / 68 / 85% without it,
                             # 63.5 / 81 / 96% with it (N = 1000 over six runs: 91.1 +- 5.2%)
easy_games = [100, 300, 1000]
held_out = 200
choice_loss = True           # online updates train the ranking act=choose uses: on the CPU the likelihood update
                             # took harder-game success 20 -> 5%, this 20 -> 32.5-40% (EXPERIMENTS.md, TextWorld)
temperature_start = 0.3      # at 1.0 the listed commands are near-uniform: training episodes are random walks
temperature_end = 0.1
hard = {"challenge": "custom", "world_size": 6, "nb_objects": 6, "quest_length": 3, "max_steps": 10}
                             # quests of 3: imitation wins 20-30% (CPU size), inside the 20-60% band for
                             # experiment 2; quests of 4 gave 7.5% on the GPU (EXPERIMENTS.md, TextWorld)
hard_games = 100
online_episodes = 320
eval_episodes = 60
eval_interval = 80
walkthroughs = [0, 30, 100, 300]
pretrain_games = 1000
pretrain_iters = 1000
start_games = 300
replay_recent_window = 128   # with replay, half of each batch comes from the whole history (easy games included)
no_replay_size = 128         # without: the buffer holds only the newest 128 items
imitation_iters = 1000
clone_iters = 1000
imitation_batch_size = 16
n_layer = 4
n_head = 4
n_embd = 128
block_size = 2048            # a harder game's walkthrough transcript (~1800 characters) fits whole, objective included
