"""The ``tritonize`` command line: one thin click command per module, assembled in ``main``.

A command parses its options, calls one library function and prints what it returns; no command
imports another, and nothing outside this package imports it.
"""
