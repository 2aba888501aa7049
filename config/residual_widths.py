# Issue 33, item 4: the residual stream's root and width (widths.py) on shakespeare_char, CPU size.
# cpu_quick's shape (4 layers, n_embd 128, 4 heads of 32, block 64); small-large-small [64,160,160,64] has
# 0.75M parameters against uniform's 0.79M (the learned root adds 0.13k uniform, 57k with the widths' reads).
# Each variant trains for the same CPU time (one thread), 3 seeds; expect differences within a few hundredths.
out_dir = "out/residual_widths"
dataset = "shakespeare_char"
cpu_seconds = 30.0
seeds = [1337, 1338, 1339]
