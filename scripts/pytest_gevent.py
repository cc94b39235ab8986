"""Run pytest with gevent's monkey patch applied first (CI runs the core behaviour tests this way).

Usage: python scripts/pytest_gevent.py [pytest arguments]
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

import pytest  # noqa: E402

sys.exit(pytest.main(sys.argv[1:]))
