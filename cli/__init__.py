"""The ``logitcache`` command line (installed as the package ``logitcache.cli``; see main.py)."""
