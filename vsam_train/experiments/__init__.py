"""Experiments of the paper that combine training and evaluation (`vsam experiment ...`)."""
