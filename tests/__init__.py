"""The test suite; a package so that tests and benchmarks import its media helpers as `tests.synth`."""
