"""Fast operators, one module per op: each holds its kernel, its dispatch and its CPU path."""
