"""The whole running server under a seeded chaos run (tests/chaos.py says what it does
and checks); CI runs a bounded size, ``bench/soak.py`` the long one."""

from __future__ import annotations

import pytest

import chaos

SEED = 11
STEPS = 200
SECONDS = 40.0  # the steps stop here if the machine is slow; the end checks still run


@pytest.mark.slow
def test_a_seeded_chaos_run_leaves_every_reader_whole_and_the_server_as_it_found_it():
    report = chaos.run(SEED, STEPS, SECONDS)
    # The run's own checks raise at the first failure; what is left to show is that
    # every kind of hostile client ran and every limit of the server was reached.
    assert all(report["actions"].values()), report["actions"]
    server = report["server"]
    assert server["refused"].get("handshake_timeout") and server["refused"].get(
        "request_timeout"), server["refused"]
    for counter in ("rate_limited", "protocol_errors", "slow_consumers_closed", "pings_sent",
                    "idle_dropped"):
        assert server[counter], f"{counter} is 0: {report}"
    assert server["internal_errors"] == 0
    assert {"bad frames 1002", "bad frames 1007", "bad frames 1009"} <= set(report["details"])
