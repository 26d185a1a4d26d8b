"""One-off studies: each answered one question once and wrote its record in benchmarks/results/.

What users run is a ``moco-bench`` mode; these are kept so that a record can be made again
(``python -m benchmarks.studies.NAME --help``), and say in their docstrings which record they
made. They import the project by its installed name, like the tests.
"""
