"""Phase write-ups (reports/phase_{1,2,3}.md and .pdf), generated from the code and the measurement files.

Run `python -m project.reports` (or `make reports`). build.py reads the files the project writes, in their own
formats; the tables and plots are rendered by their owners (project/bench/inference/report.py,
project/bench/finetune/report.py, finetune_run.py) and only embedded here.

phase1.py  the background answers: phase_1.template.md with numbers and links computed from the code (facts.py)
phase2.py  the KV cache: the code, sample outputs, Table 1 (the inference benchmark's renderer) and its reading
phase3.py  fine-tuning: the code, the run (finetune_run.py), Tables 3 and 2 (the fine-tuning benchmark's renderer)
finetune_run.py  a fine-tuning run's own report (summary.md, samples.md, loss.png), also used by finetuning
facts.py  numbers and source links from the code;  md.py  Markdown helpers;  pdf.py  Markdown -> PDF (fpdf2)
"""
