"""Request ids: taken when sane, generated otherwise."""
from __future__ import annotations

import pytest

from api.middleware import new_request_id, sane_request_id


@pytest.mark.parametrize("value", [
    "abc", "0f8fad5b-d9cb-469f-a165-70867728950e", "a" * 128, "svc.frontend:1234_x-y", "7",
])
def test_sane_ids_are_kept(value):
    assert sane_request_id(value) == value


@pytest.mark.parametrize("value", [
    None, "", " ", "a" * 129, "has space", "new\nline", "tab\there", "-leading-dash",
    "quote\"d", "semi;colon", "ünïcode", "<script>", "a/b",
])
def test_insane_ids_are_rejected(value):
    assert sane_request_id(value) is None


def test_generated_ids_are_unique_and_sane():
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(sane_request_id(i) == i and len(i) == 32 for i in ids)
