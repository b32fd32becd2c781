"""The fine-tuning benchmark behind `benchmark_finetuning.py`: every technique combination measured in its
own process (Table 3), memory broken down by what holds it (Table 2), and a memory timeline of one step.

configs.py   which configurations run (gradient checkpointing x mixed precision x LoRA, + accumulation)
child.py     one configuration, in a fresh child process: the real training step, timed and metered
hf_child.py  the same measurement on Hugging Face transformers + peft (`--compare hf` only)
sweep.py     runs each configuration in a fresh child process (project.bench.harness), writes the CSV
report.py    Table 2, Table 3 and the plots, computed from the CSV: the one renderer
"""
