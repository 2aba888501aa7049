# issue 33, item 3, third try, read after config/turing_shakespeare_char_strong_d.py: there the discriminator stayed
# at chance (BCE 0.693 through 120 alternating steps), so its rewards were ~0 and the question went unanswered. Here
# it first learns alone for 300 steps (adversarial.Adversarial's d_warmup), then the rounds alternate as in the
# strong run. Both arms, one seed.
#   OMP_NUM_THREADS=1 nice -n 10 python experiments/turing.py config/turing_shakespeare_char_strong_d.py \
#       config/turing_shakespeare_char_warm_d.py
results = "experiments/results/turing_shakespeare_char_warm_d.json"
arms = ["adversarial", "lm_only"]
settings = {"length": 64, "prompt": 16, "batch_size": 16, "d_steps": 4, "g_steps": 1, "d_lr": 1e-3, "g_lr": 1e-4,
            "adv_weight": 1.0, "lm_weight": 1.0, "d_warmup": 300}
