"""pytest plugins shared by the test suites (loaded from tests/conftest.py)."""
