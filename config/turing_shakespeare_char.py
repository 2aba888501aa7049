# issue 33, item 3: the auto Turing test on shakespeare_char. A 4 x 128 character generator (config/cpu_quick.py's
# recipe, 600 steps), then per seed two arms from it: adversarial (REINFORCE on a discriminator's log-odds + the LM
# loss) and lm_only (the same rounds, REINFORCE weight 0). The discriminator starts as the generator's copy and
# reads training windows only. Question: do the samples get more human-like by distinct-4 and val 6-gram overlap,
# with the val loss within 0.02? Sized for one core of a 2-core CPU under ~10x load (~15 min a seed).
out = "out/turing"
results = "experiments/results/turing_shakespeare_char.json"
generator_config = "config/cpu_quick.py"
generator_iters = 600
seeds = [1337, 1]
rounds = 30
eval_every = 10
eval_iters = 10
measure_samples = 64
settings = {"length": 64, "prompt": 16, "batch_size": 16, "d_steps": 2, "g_steps": 1, "d_lr": 3e-4, "g_lr": 1e-4,
            "adv_weight": 1.0, "lm_weight": 1.0}
