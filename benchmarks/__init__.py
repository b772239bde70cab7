"""Benchmarks of daemoneye-eventbus: end-to-end (``e2e``) and hot-path micro benchmarks."""
