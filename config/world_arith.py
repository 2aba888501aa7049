# arith with the calc tool: imitate 1000 teacher transcripts (train.py, then cloning the actions),
# then play 200 held-out seeds greedily. Expect >= 95% success (compare world_arith_notool.py).
out_dir = "out/world_arith"
tasks = {"arith": {}}
init_from = "imitate"
mode = "evaluate"
imitation_episodes = 1000
imitation_iters = 300
clone_iters = 900
imitation_batch_size = 16
imitation_lr = 2e-3
n_layer = 2
n_head = 4
n_embd = 64
block_size = 192
eval_episodes = 200
