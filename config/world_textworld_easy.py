# Easy TextWorld games (custom, 3 rooms, 4 objects, quests of 2 actions): imitate the walkthroughs of
# `games` training games, then play 100 unseen games. Issue 11, experiment 1 (EXPERIMENTS.md).
tasks = {"textworld": {"challenge": "custom", "world_size": 3, "nb_objects": 4, "quest_length": 2,
                       "games": 300, "max_steps": 8}}
out_dir = "out/world_textworld_easy"
init_from = "imitate"
mode = "evaluate"
act = "choose"
choose_untried = True        # never the same command twice in one game state: +15.5 / +6.5 points on the CPU
                             # (EXPERIMENTS.md, TextWorld failures); the GPU's 59.5 / 68 / 85% were without it
imitation_episodes = 600     # walkthrough episodes drawn from the training pool
imitation_iters = 100
clone_iters = 200
imitation_batch_size = 8
n_layer = 2
n_head = 4
n_embd = 64
block_size = 1024            # characters: a whole easy game's transcript (about 950) fits
eval_episodes = 100
