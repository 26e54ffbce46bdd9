"""Evaluation suites: language modelling (bits per byte) now; classification, zero-shot, recall later."""
