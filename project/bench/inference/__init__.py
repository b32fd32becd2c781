"""The inference benchmark behind `benchmark_inference.py` (Table 1).

config.py   the grid of configurations and the spec each child process receives
prompt.py   prompts of an exact token length
measure.py  timing and peak memory of repeated generate calls (inside the child)
child.py    the child process: one configuration with our `Llama.generate` or Hugging Face's `generate`
hf.py       the Hugging Face side of `--compare hf` (imports transformers; only ever inside a child)
sweep.py    runs each configuration in a fresh child process (project.bench.harness)
results.py  results.csv (every repeat) and summary.csv (medians per configuration)
report.py   Table 1, the comparison with Hugging Face, report.md and the plots: the one renderer
"""
