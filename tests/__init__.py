"""Caduceus tests. Assertions in the shared helpers get pytest's detailed messages too."""

import pytest

pytest.register_assert_rewrite("tests.helpers")
