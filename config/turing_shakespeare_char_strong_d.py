# issue 33, item 3, second try: config/turing_shakespeare_char.py's discriminator stayed at chance (BCE 0.693 after
# 60 steps at lr 3e-4), so the REINFORCE term was ~0 and the arms could not differ. Here the discriminator learns
# 3x faster and twice as often (lr 1e-3, 4 steps a round); the adversarial arm only (compare with the first run's
# lm_only arm of the same seed and generator). Sized for one core of a 2-core CPU under ~10x load (~10 min).
out = "out/turing"
results = "experiments/results/turing_shakespeare_char_strong_d.json"
generator_config = "config/cpu_quick.py"
generator_iters = 600
arms = ["adversarial"]
seeds = [1337]
rounds = 30
eval_every = 10
eval_iters = 10
measure_samples = 64
settings = {"length": 64, "prompt": 16, "batch_size": 16, "d_steps": 4, "g_steps": 1, "d_lr": 1e-3, "g_lr": 1e-4,
            "adv_weight": 1.0, "lm_weight": 1.0}
