"""Benchmarks: activations become time, measured side by side in one process.

``presets`` builds randomly initialised models of named shapes; ``cost_model``
counts what the ideal speed-up bound assumes (routed share of weights and of
FLOPs, profiling's FLOP floor); ``timing`` alternates the untouched and the
planned model and reports medians with their spread; ``breakdown`` splits a
forward's time into router, expert matmuls, other expert work and the rest;
``run`` is what ``allocplan bench`` does. Nothing here asserts a time: tests
check the structure of the reports, and the docs print the measured ratios.
"""
