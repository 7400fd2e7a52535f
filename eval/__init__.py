"""QA evaluation: metrics, dataset readers and evaluation scripts."""
