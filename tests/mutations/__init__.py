"""A curated mutation check: named one-line breakages of the README's promises.

``table.py`` lists them, ``runner.py`` applies each to a scratch copy of the
repository and runs the tests that guard it there (they must fail), and
``tests/test_mutations.py`` makes every surviving mutant a failing test.
Run alone: ``python tests/mutations/runner.py`` (see CONTRIBUTING.md).
"""
