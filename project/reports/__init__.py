"""Phase write-ups (reports/phase_{1,2,3}.md and .pdf), generated from the code and the measurement files.

Run `python -m project.reports` (or `make reports`). Where each input is looked for, and which column holds
what, is set in one place: `project/reports/inputs.py`.
"""
