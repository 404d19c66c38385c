"""Evaluation of generated clips: a judge in code for the synthetic shapes prompts."""
