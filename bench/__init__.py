"""npl-agi's benchmarks: ``python -m bench`` from the repository root (``--help`` for options).

Every figure is measured against the bundled simulator on 127.0.0.1 and printed with its ratio
to a reference measured in the same run (the naive script in ``baseline_agi.py``, unless a
section says otherwise), because on a shared machine ratios travel better than milliseconds.
"""
