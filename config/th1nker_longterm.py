# Th1nker (issue 29), experiment (3) on a CPU: long-term memory. Episodes of 4 facts `name value` (16 names, 10
# values). Run 1 compresses each fact (`name value MEM`, R P P) into one memory token (the MEM position's latent);
# run 2 asks `? name` (R P M P O) and reads the memory tokens (M). Trained end to end with every token of the
# episode read (gradients through the compression); tested also across runs: each episode's tokens written to a
# long-term store (memory.py's KNNStore) saved to disk, read back, top-k retrieved by the ReadMemory block's own
# key/query similarity. Baselines: the facts in context (R P P P O), no memory (the question alone: chance 0.1).
# ~6 min of a loaded core per seed.
experiment = "longterm"
n_embd = 32
n_head = 2
attn_window = 0
init_state = "random"
n_facts = 4
n_names = 16
retrieve_k = [1, 4]
steps = 400
batch_size = 64
learning_rate = 3e-3
test_problems = 512
