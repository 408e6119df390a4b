"""``bora-bench``: microbenchmarks of the ops against what users would otherwise run."""
