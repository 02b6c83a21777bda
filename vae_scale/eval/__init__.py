"""Evaluation on held-out images: one evaluator, one report (scalars, PNGs, history, log lines),
and rFID's statistics with their all-gather."""
