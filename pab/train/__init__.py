"""Training the `-small` models on synthetic data: `python -m pab.train --help`."""
