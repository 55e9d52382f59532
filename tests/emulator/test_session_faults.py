"""Faults with scope `session`: session creation fails while the stream keeps serving valid tokens."""

from __future__ import annotations

import pytest

from ingestor_dev.emulator import Faults
from tests.emulator.conftest import Api, event

pytestmark = pytest.mark.asyncio(loop_scope="function")

SESSION = "/v2/billing/meter_event_session"


async def test_scope_session_fails_session_creation_only(api: Api):
    token = await api.session()
    api.emu.set_faults(Faults(error_no_header=1.0, error_status=503, scope="session"))
    status, body, _ = await api.call("POST", SESSION)
    assert status == 503
    assert body["error"]["type"] == "api_error"
    # The stream and the other endpoints are untouched: an existing token still delivers.
    status, _, _ = await api.stream(token, [event("during")])
    assert status == 200
    assert (await api.call("GET", "/v1/billing/meters"))[0] == 200
    assert api.emu.state.identifier_info("during")["accepted"] == 1
    # A revoked token is refused (401) while no new one can be had; then creation works again.
    api.emu.revoke_sessions()
    assert (await api.stream(token, [event("revoked")]))[0] == 401
    assert (await api.call("POST", SESSION))[0] == 503
    api.emu.set_faults()
    fresh = await api.session()
    assert (await api.stream(fresh, [event("after")]))[0] == 200


async def test_scope_session_is_accepted_by_the_control_endpoint(api: Api):
    status, body, _ = await api.call(
        "POST", "/_emulator/faults", key=None, json={"replace": True, "rate_limit": 1.0, "scope": "session"}
    )
    assert (status, body["scope"], body["rate_limit"]) == (200, "session", 1.0)
    assert (await api.call("POST", SESSION))[0] == 429
    status, body, _ = await api.call("POST", "/_emulator/faults", key=None, json={"scope": "replicas"})
    assert status == 400
    assert "scope" in body["error"]["message"]
