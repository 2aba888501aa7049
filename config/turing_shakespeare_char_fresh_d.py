# issue 33, item 3, fourth try, read after config/turing_shakespeare_char_strong_d.py and _warm_d.py: the warm-up
# left the discriminator at chance (BCE 0.6946 after 300 steps). A guess: a copy of the generator starts from features
# under which the generator's own samples look typical. Here the discriminator has new weights of the same shape
# (d_init=fresh), with the same warm-up and rounds; both arms, one seed.
#   OMP_NUM_THREADS=1 nice -n 10 python experiments/turing.py config/turing_shakespeare_char_strong_d.py \
#       config/turing_shakespeare_char_warm_d.py config/turing_shakespeare_char_fresh_d.py
results = "experiments/results/turing_shakespeare_char_fresh_d.json"
settings = {"length": 64, "prompt": 16, "batch_size": 16, "d_steps": 4, "g_steps": 1, "d_lr": 1e-3, "g_lr": 1e-4,
            "adv_weight": 1.0, "lm_weight": 1.0, "d_warmup": 300, "d_init": "fresh"}
