from __future__ import annotations

import pytest

LAYOUTS = [pytest.param(False, id="split"), pytest.param(True, id="packed")]


@pytest.fixture(params=LAYOUTS)
def packed(request) -> bool:
    return request.param
