"""Data made by code for training and evaluating the small models."""
