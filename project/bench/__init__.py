"""The inference benchmark behind `benchmark_inference.py`.

config.py   the grid of configurations and the job each subprocess receives
prompt.py   prompts of an exact token length
measure.py  timing and peak memory of repeated generate calls (used inside the subprocess)
worker.py   the subprocess: runs one configuration with our `Llama.generate` or Hugging Face's `generate`
hf.py       the Hugging Face side of `--compare hf` (imports transformers; only ever inside a worker)
runner.py   runs each configuration in a fresh subprocess and records OOM and errors
results.py  the CSV, the Table-1 markdown and the plots
"""
