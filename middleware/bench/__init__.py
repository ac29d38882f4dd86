"""Benchmarks behind ``alignq bench``. Modules here import ``workers`` (torch) only inside ``run``."""
