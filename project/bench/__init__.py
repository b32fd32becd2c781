"""The benchmark harness and the two benchmarks built on it.

harness.py   one configuration per fresh child process (spec JSON in, result JSON out), status words
             (ok, OOM, error, timeout, skipped), OOM detection, environment and provenance facts
inference/   Table 1: generation with and without the KV cache (benchmark_inference.py)
finetune/    Tables 2 and 3: every fine-tuning technique combination (benchmark_finetuning.py)
gpu_check.py `make gpu-check`: the `cuda` tests, then short Tables 1 and 3 on this machine's GPU (reports/gpu/)

Each benchmark has the same parts: config.py / configs.py (what is swept, the spec a child receives),
child.py (the measurement, inside the child), hf.py / hf_child.py (the same measurement on Hugging Face's
stack, for --compare hf), sweep.py (runs the children, writes the measurement CSV) and report.py (the one
renderer of its tables and plots, used by the benchmark's own report and by project/reports).
"""
