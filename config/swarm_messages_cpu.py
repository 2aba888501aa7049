# experiments/swarm_learning.py, issue 13 numbers 3 and 4 with a worker that has learnt to read messages (the
# first runs used a half-trained worker that a right HINT line made worse: 72% -> 33% greedy). The worker: the
# single learner of the small CPU run (world.py expert iteration, 72% greedy / 40% sampled at 0.5), made by
#   python experiments/swarm_learning.py --out=out/swarm_learning_cpu --parts='["equal"]'
# then 300 behaviour-cloning steps on 1000 teacher transcripts, half with a PEERS line (2-3 plans, half of them
# wrong) and half with a HINT line (70% right). Temperature 1.0: at 0.5 that worker solves ~85% alone and a
# swarm of 4 leaves nothing to gain. ~10 min on the shared 2-core CPU once the guides are made (first run: +~35 min).
out = "out/swarm_messages_cpu"
parts = ["messages", "guide"]
worker_ckpt = "out/swarm_learning_cpu/runs/arith_single_learner/policy.pt"
notes_training = {"iters": 300}
goals = 100
eval_goals = 60
temperature = 1.0
