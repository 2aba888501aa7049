# issue 33, item 3, third try: in both earlier runs (config/turing_shakespeare_char.py, _strong_d.py) the
# discriminator stayed at chance through 60-120 alternating steps, so its rewards were ~0 and the question went
# unanswered. Here it first learns alone for 300 steps (adversarial.Adversarial's d_warmup) at the strong run's lr
# 1e-3, then the rounds alternate as in the strong run. Both arms, one seed (the CPU session's time).
#   OMP_NUM_THREADS=1 nice -n 10 python experiments/turing.py config/turing_shakespeare_char_warm_d.py
out = "out/turing"
results = "experiments/results/turing_shakespeare_char_warm_d.json"
generator_config = "config/cpu_quick.py"
generator_iters = 600
arms = ["adversarial", "lm_only"]
seeds = [1337]
rounds = 30
eval_every = 10
eval_iters = 10
measure_samples = 64
settings = {"length": 64, "prompt": 16, "batch_size": 16, "d_steps": 4, "g_steps": 1, "d_lr": 1e-3, "g_lr": 1e-4,
            "adv_weight": 1.0, "lm_weight": 1.0, "d_warmup": 300}
