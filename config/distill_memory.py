# Issue 33, item 5: a dense teacher distilled into its memory-layer clone (experiments/distill_memory.py), CPU size.
# 50 people x 6 attributes (1,440 bits); the dense 1 x 32 teacher sees each person 384 times (600 steps of 32
# biographies), each student 128 times (200 steps): short enough that what a student stores is exposure-limited,
# so a teacher's soft targets have room to help. 3 student seeds against one teacher.
out_dir = "out/distill_memory"
n_people = 50
size = [1, 2, 32]
teacher_steps = 600
steps = 200
batch_size = 32
seeds = [1337, 1338, 1339]
