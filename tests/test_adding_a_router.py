"""docs/adding_a_router.md, followed: its router class and registry lines, read from the page, are registered
(tests/guide_router.py) and the suite runs every test parametrised over moe.ROUTERS with it. The page cannot
drift from the code: a change of the gate contract or of the registry breaks this test, and a new cross-router
test must be named on the page."""
import os
import re
import subprocess
import sys

from tests.guide_router import GUIDE, guide_router

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cross_router_tests_in_the_guide():
    """'tests/test_x.py::test_name' of the guide's table of cross-router tests."""
    with open(GUIDE) as f:
        return set(re.findall(r'^\| `(tests/test_\w+\.py::test_\w+)` \|', f.read(), re.M))


def test_every_cross_router_test_passes_with_the_guides_router_and_is_named_in_the_guide():
    name = guide_router()[0]
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-rA', '-p', 'tests.guide_router', '-k', name,
                             'tests', '--ignore', 'tests/test_adding_a_router.py'],
                            cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    passed = {re.sub(r'\[.*', '', line.split()[1]) for line in result.stdout.splitlines()
              if line.startswith('PASSED ')}
    assert passed == cross_router_tests_in_the_guide()
