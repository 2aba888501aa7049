# serve.py on a GPU box: 32 streams decoded together, room for a few 124M models, one training job at a time.
# python serve.py config/serve.py   (add --host=0.0.0.0 --token=... to let other machines in)
device = "cuda"
max_batch = 32
model_memory_mb = 16384
max_running_jobs = 1
