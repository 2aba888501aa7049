"""
The code a Hugging Face export carries: compress.py --format=hf (hf_export.py) copies these files into the
exported folder, where transformers runs them with trust_remote_code=True. They import transformers, never
µLM, so the folder works on its own; tests/test_hf_export.py checks they compute what model.py computes.
"""
