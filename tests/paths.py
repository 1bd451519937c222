"""Where the repository and the test fixtures are, for test files at any depth of tests/."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
