"""The batch wait setting: "auto" or milliseconds, and the bounds of an automatic one."""

from __future__ import annotations

import pytest

from distdl.inference import AUTO_WAIT_MS, auto_batch_wait_ms, parse_batch_wait


def test_auto_wait_is_one_lone_pass_within_its_bounds():
    low, high = AUTO_WAIT_MS
    assert auto_batch_wait_ms(0.4) == low  # a millisecond-scale model waits the least
    assert auto_batch_wait_ms(17.5) == 17.5
    assert auto_batch_wait_ms(900.0) == high


def test_parse_batch_wait_takes_auto_or_milliseconds():
    assert parse_batch_wait("auto") == parse_batch_wait(" AUTO ") == "auto"
    assert parse_batch_wait("15") == 15.0 and parse_batch_wait(0) == 0.0
    for bad in ("fast", "-1", "nan", "inf", ""):
        with pytest.raises(ValueError, match="'auto' or milliseconds"):
            parse_batch_wait(bad)
