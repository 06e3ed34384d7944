"""The reliability tier (`make reliability`): bad input, load and faults, in figures."""
